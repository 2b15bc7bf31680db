//! `sandbox-init`: starts a sandbox (`sandbox-init launch`, config on stdin) and then serves
//! as its pid 1. Run by the dev-box daemon, not by hand.

fn main() {
    let mut args = std::env::args().skip(1);
    let code = match args.next().as_deref() {
        Some("launch") => devbox_runtime::container::launch_main(),
        _ => {
            eprintln!(
                "sandbox-init is started by the dev-box daemon (usage: sandbox-init launch < config.json)"
            );
            2
        }
    };
    std::process::exit(code);
}
