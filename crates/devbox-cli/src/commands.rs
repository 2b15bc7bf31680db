//! The client commands: each builds a request, calls the daemon, prints the answer.

use anyhow::{Context, bail};
use devbox_client::{Client, ClientError};
use devbox_spec::SandboxManifest;
use devbox_wire::stream::ClientMsg;
use devbox_wire::{
    CloneRequest, CreateSandboxRequest, ExecRequest, ImportImageRequest, RollbackRequest,
    SnapshotInfo, SnapshotRequest, TtySize,
};

use crate::cli::{
    AuditCommand, Cli, Command, ExecOpts, Format, ImageCommand, NetworkArgs, NetworkCommand,
    PolicyCommand, PoolCommand, SandboxOpts, SnapshotCommand,
};
use crate::{daemon, output, stream};

/// Prints the OpenAPI document (no daemon needed).
pub fn print_openapi() -> anyhow::Result<()> {
    println!("{}", devbox_wire::openapi::document().to_pretty_json()?);
    Ok(())
}

/// Exit code of a command the checks hold for approval.
pub const EXIT_APPROVAL: u8 = 2;
/// Exit code of a command the checks deny.
pub const EXIT_DENIED: u8 = 3;

/// The exit code for an error: 127 command not found, 126 not runnable, 3 denied by the
/// checks, 2 waiting for an approval, 1 otherwise.
pub fn exit_code_of(e: &anyhow::Error) -> u8 {
    match e.downcast_ref::<ClientError>() {
        Some(ClientError::Api { code, .. }) if code == "denied" => EXIT_DENIED,
        Some(ClientError::Api { code, .. }) if code == "approval_required" => EXIT_APPROVAL,
        Some(ClientError::Api { code, message, .. }) if code == "exec_failed" => {
            if message.contains("not found") || message.contains("No such file") {
                127
            } else {
                126
            }
        }
        _ => 1,
    }
}

/// Connects to the daemon: the one at --host, or the local one, starting it if none answers
/// (unless `DEVBOX_NO_AUTOSTART` is set).
fn client(cli: &Cli) -> anyhow::Result<Client> {
    let actor = std::env::var("DEVBOX_ACTOR").ok().filter(|a| !a.is_empty());
    if let Some(host) = cli.host.as_deref().filter(|h| !h.is_empty()) {
        return Ok(
            Client::remote(host, cli.token.clone(), cli.ca_cert.as_deref())?.with_actor(actor),
        );
    }
    let socket = cli.socket_path();
    // A socket file that accepts nothing (a crashed daemon) is handled like a missing one;
    // one this user may not open means the daemon runs and is not for them.
    let connected = std::os::unix::net::UnixStream::connect(&socket);
    if let Err(e) = &connected
        && e.kind() == std::io::ErrorKind::PermissionDenied
    {
        bail!(
            "permission denied on {}: the dev-box daemon is for root and the members of the group it names (sandboxd --group): run the command with sudo or join that group",
            socket.display()
        );
    }
    if !socket.exists() || connected.is_err() {
        if std::env::var_os("DEVBOX_NO_AUTOSTART").is_some() {
            bail!(
                "the dev-box daemon is not running (no answer on {}): start it with `sudo sandbox daemon`",
                socket.display()
            );
        }
        daemon::spawn_and_wait(cli)?;
    }
    Ok(Client::new(socket)
        .with_actor(actor)
        .with_token(cli.token.clone()))
}

fn key_values(items: &[String], what: &str) -> anyhow::Result<Vec<(String, String)>> {
    items
        .iter()
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => bail!("{what} {kv:?} must look like KEY=VALUE"),
        })
        .collect()
}

/// Builds a create request from flags and an optional spec file.
pub fn create_request(
    opts: &SandboxOpts,
    name: Option<String>,
    start: bool,
) -> anyhow::Result<CreateSandboxRequest> {
    let mut m = match &opts.file {
        Some(f) => {
            let text =
                std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
            SandboxManifest::parse(&text)
                .with_context(|| format!("invalid spec {}", f.display()))?
        }
        None => SandboxManifest::new(None, Default::default()),
    };
    let s = &mut m.spec;
    if let Some(v) = &opts.image {
        s.image = Some(v.clone());
    }
    if let Some(v) = &opts.memory {
        s.limits.memory = Some(v.clone());
    }
    if let Some(v) = &opts.cpus {
        s.limits.cpu = Some(v.clone());
    }
    if let Some(v) = opts.pids {
        s.limits.pids = Some(v);
    }
    if let Some(v) = &opts.disk {
        s.limits.disk = Some(v.clone());
    }
    if let Some(v) = &opts.exec_timeout {
        s.limits.exec_timeout = Some(v.clone());
    }
    for (k, v) in key_values(&opts.env, "environment variable")? {
        s.env.insert(k, v);
    }
    if let Some(v) = &opts.workdir {
        s.workdir = Some(v.clone());
    }
    if let Some(v) = &opts.user {
        s.user = Some(v.clone());
    }
    if let Some(v) = &opts.hostname {
        s.hostname = Some(v.clone());
    }
    if opts.auto_snapshot {
        s.rollback.enabled = true;
        s.rollback.auto_snapshot = true;
    }
    if let Some(v) = &opts.main_command {
        s.command = vec![v.clone()];
    }
    if let Some(mode) = opts.network {
        s.network.mode = mode.into();
    }
    s.network.allow.extend(opts.allow.iter().cloned());
    s.network.deny.extend(opts.deny.iter().cloned());
    s.network.ports.extend(opts.publish.iter().copied());
    for (k, v) in key_values(&opts.labels, "label")? {
        m.metadata.labels.insert(k, v);
    }
    m.validate().context("invalid sandbox settings")?;
    Ok(CreateSandboxRequest {
        name,
        manifest: Some(m),
        start,
    })
}

/// Whether the user separated the command with `--` (argv form).
fn dashdash() -> bool {
    std::env::args().any(|a| a == "--")
}

fn exec_request(
    command: &[String],
    env: &[String],
    workdir: Option<String>,
    user: Option<String>,
    tty: bool,
) -> anyhow::Result<ExecRequest> {
    let mut req = ExecRequest {
        workdir,
        user,
        ..Default::default()
    };
    if command.len() == 1 && !dashdash() {
        req.command = Some(command[0].clone());
    } else {
        req.argv = command.to_vec();
    }
    req.env = key_values(env, "environment variable")?
        .into_iter()
        .collect();
    if tty {
        let (rows, cols) = stream::terminal_size().unwrap_or((24, 80));
        req.tty = Some(TtySize { rows, cols });
    }
    Ok(req)
}

fn exec_opts_request(command: &[String], o: &ExecOpts) -> anyhow::Result<ExecRequest> {
    let mut req = exec_request(command, &o.env, o.workdir.clone(), o.user.clone(), o.tty)?;
    req.rollback_on_failure = o.rollback_on_failure;
    req.approval = o.approval.clone();
    if let Some(t) = &o.timeout {
        devbox_spec::parse_exec_timeout(t).map_err(|e| anyhow::anyhow!("--timeout: {e}"))?;
        req.timeout = Some(t.clone());
    }
    Ok(req)
}

pub(crate) fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Runs a client command; returns the process exit code.
pub async fn run(cli: &Cli) -> anyhow::Result<i32> {
    let c = client(cli)?;
    let cmd = &cli.command;
    match cmd {
        Command::Create { .. }
        | Command::Exec { .. }
        | Command::Run { .. }
        | Command::Ls { .. }
        | Command::Inspect { .. }
        | Command::Update { .. }
        | Command::Start { .. }
        | Command::Stop { .. }
        | Command::Destroy { .. } => sandbox_command(&c, cmd).await,
        Command::Snapshot(_)
        | Command::Snapshots { .. }
        | Command::Diff { .. }
        | Command::Rollback { .. }
        | Command::Clone { .. } => snapshot_command(&c, cmd).await,
        Command::Network(args) => network_command(&c, args).await,
        Command::Stats { .. }
        | Command::Ps { .. }
        | Command::Events { .. }
        | Command::Webhooks { .. } => crate::monitor::command(&c, cmd).await,
        Command::Check { .. }
        | Command::Policy(_)
        | Command::Approvals { .. }
        | Command::Approve { .. }
        | Command::Deny { .. } => check_command(&c, cmd).await,
        Command::Audit(_) | Command::ExportLogs { .. } => audit_command(&c, cmd).await,
        Command::Token(t) => crate::tokens::command(&c, t).await,
        Command::Image(_) | Command::Pool(_) | Command::Daemon { .. } | Command::Api(_) => {
            image_command(&c, cmd).await
        }
    }
}

/// The sandbox commands: create, exec, run, ls, inspect, update, start, stop, destroy.
async fn sandbox_command(c: &Client, cmd: &Command) -> anyhow::Result<i32> {
    match cmd {
        Command::Create {
            name,
            opts,
            no_start,
        } => {
            let req = create_request(opts, name.clone(), !no_start)?;
            let info = c.create(&req).await?;
            println!("{}", info.name);
        }
        Command::Exec {
            opts,
            name,
            command,
        } => {
            let req = exec_opts_request(command, opts)?;
            let wait = match &opts.wait {
                Some(w) => Some(std::time::Duration::from_millis(
                    devbox_spec::parse_exec_timeout(w)
                        .map_err(|e| anyhow::anyhow!("--wait: {e}"))?,
                )),
                None => None,
            };
            let stdin = stream::want_stdin(opts.interactive);
            let path = format!("/v1/sandboxes/{name}/exec/stream");
            let first = ClientMsg::Exec {
                exec: req,
                stdin,
                no_wait: opts.no_wait,
            };
            let approval = stream::ApprovalWaiting {
                wait,
                resume: ("sandbox exec --approval ".into(), {
                    // The same options (they are part of what was approved), quoted.
                    let mut words: Vec<String> = Vec::new();
                    for (flag, on) in [
                        ("-i", opts.interactive),
                        ("-t", opts.tty),
                        ("--rollback-on-failure", opts.rollback_on_failure),
                    ] {
                        if on {
                            words.push(flag.into());
                        }
                    }
                    for e in &opts.env {
                        words.extend(["-e".into(), e.clone()]);
                    }
                    for (flag, v) in [
                        ("-w", &opts.workdir),
                        ("-u", &opts.user),
                        ("--timeout", &opts.timeout),
                    ] {
                        if let Some(v) = v {
                            words.extend([flag.to_string(), v.clone()]);
                        }
                    }
                    words.push(name.clone());
                    words.extend(command.iter().cloned());
                    format!(" {}", devbox_spec::shell_join(&words))
                }),
            };
            return Ok(stream::run(c, &path, first, opts.tty, stdin, approval).await?);
        }
        Command::Run {
            rm,
            name,
            sandbox,
            interactive,
            tty,
            command,
        } => {
            let create = create_request(sandbox, name.clone(), true)?;
            let req = exec_request(command, &[], None, None, *tty)?;
            let stdin = stream::want_stdin(*interactive);
            if *rm {
                let first = ClientMsg::Run {
                    sandbox: Box::new(create),
                    exec: req,
                    stdin,
                };
                return Ok(stream::run(
                    c,
                    "/v1/run/stream",
                    first,
                    *tty,
                    stdin,
                    stream::ApprovalWaiting::default(),
                )
                .await?);
            }
            let mut create = create;
            if create.name.is_none()
                && create
                    .manifest
                    .as_ref()
                    .is_none_or(|m| m.metadata.name.is_none())
            {
                create.name = Some(format!("run-{}", std::process::id()));
            }
            let info = c.create(&create).await?;
            eprintln!(
                "sandbox {} created (remove it with `sandbox destroy {}`)",
                info.name, info.name
            );
            let path = format!("/v1/sandboxes/{}/exec/stream", info.name);
            let first = ClientMsg::Exec {
                exec: req,
                stdin,
                no_wait: false,
            };
            return Ok(stream::run(
                c,
                &path,
                first,
                *tty,
                stdin,
                stream::ApprovalWaiting::default(),
            )
            .await?);
        }
        Command::Ls { format, quiet } => {
            let list = c.list().await?;
            if *quiet {
                for s in &list {
                    println!("{}", s.name);
                }
            } else if *format == Format::Json {
                print_json(&list)?;
            } else {
                let rows: Vec<Vec<String>> = list
                    .iter()
                    .map(|s| {
                        vec![
                            s.name.clone(),
                            output::state(s),
                            s.image.clone(),
                            output::ago(&s.created_at),
                            s.usage
                                .map(|u| output::bytes(u.memory_bytes))
                                .unwrap_or_else(|| "-".into()),
                            s.usage
                                .map(|u| u.pids.to_string())
                                .unwrap_or_else(|| "-".into()),
                        ]
                    })
                    .collect();
                output::table(
                    &["NAME", "STATE", "IMAGE", "CREATED", "MEMORY", "PIDS"],
                    &rows,
                );
            }
        }
        Command::Inspect { name } => print_json(&c.inspect(name).await?)?,
        Command::Update {
            name,
            memory,
            cpus,
            pids,
            disk,
            exec_timeout,
        } => {
            let req = devbox_wire::UpdateLimitsRequest {
                memory: memory.clone(),
                cpu: cpus.clone(),
                pids: *pids,
                disk: disk.clone(),
                exec_timeout: exec_timeout.clone(),
            };
            if req.is_empty() {
                bail!("nothing to change: give --memory, --cpus, --pids, --disk or --exec-timeout");
            }
            let info = c.update_limits(name, &req).await?;
            println!("{}: {}", info.name, output::limits(&info.limits));
        }
        Command::Start { name } => {
            c.start(name).await?;
        }
        Command::Stop { name, time } => {
            c.stop(name, Some(*time)).await?;
        }
        Command::Destroy { names, force } => {
            let mut failed = false;
            for n in names {
                if let Err(e) = c.destroy(n, *force).await {
                    eprintln!("sandbox: {e}");
                    failed = true;
                }
            }
            return Ok(if failed { 1 } else { 0 });
        }
        // `run` sends only this group's commands here.
        _ => unreachable_command()?,
    }
    Ok(0)
}

/// The snapshot commands: snapshot, snapshots, diff, rollback, clone.
async fn snapshot_command(c: &Client, cmd: &Command) -> anyhow::Result<i32> {
    match cmd {
        Command::Snapshot(args) => match &args.command {
            Some(SnapshotCommand::Rm {
                name,
                snapshot,
                force,
            }) => c.delete_snapshot(name, snapshot, *force).await?,
            Some(SnapshotCommand::Export {
                name,
                snapshot,
                output,
            }) => {
                let shown = crate::progress::Progress::bytes("exporting", None);
                let bytes = c
                    .export_snapshot_progress(name, snapshot, output, shown.callback())
                    .await?;
                drop(shown);
                eprintln!("wrote {} ({})", output.display(), output::bytes(bytes));
            }
            Some(SnapshotCommand::Import { file, name, start }) => {
                let size = std::fs::metadata(file).ok().map(|m| m.len());
                let shown = crate::progress::Progress::bytes("importing", size);
                let info = c
                    .import_snapshot_progress(file, name.as_deref(), *start, shown.callback())
                    .await?;
                drop(shown);
                println!("{}", info.name);
            }
            None => {
                let name = args.name.as_deref().unwrap_or_default();
                let req = SnapshotRequest {
                    name: args.snapshot.clone(),
                    message: args.message.clone(),
                    labels: key_values(&args.labels, "label")?.into_iter().collect(),
                    with_processes: args.with_processes,
                };
                println!("{}", c.snapshot(name, &req).await?.name);
            }
        },
        Command::Snapshots { name, format } => {
            let snaps = c.snapshots(name).await?;
            if *format == Format::Json {
                print_json(&snaps)?;
            } else {
                print_tree(&snaps);
            }
        }
        Command::Diff {
            name,
            from,
            to,
            format,
        } => {
            let shown = crate::progress::Progress::spinner(&format!("comparing {name}"));
            let d = c.diff(name, from.as_deref(), to.as_deref()).await?;
            drop(shown);
            if *format == Format::Json {
                print_json(&d)?;
            } else {
                for ch in &d.changes {
                    let size = if ch.dir || ch.kind == devbox_wire::ChangeKind::Deleted {
                        String::new()
                    } else {
                        format!("  ({})", output::bytes(ch.size))
                    };
                    println!("{} {}{}", ch.kind.letter(), ch.path, size);
                }
            }
        }
        Command::Rollback { name, to, paths } => {
            let _shown = crate::progress::Progress::spinner(&format!("rolling back {name}"));
            c.rollback(
                name,
                &RollbackRequest {
                    to: to.clone(),
                    paths: paths.clone(),
                },
            )
            .await?;
        }
        Command::Clone {
            name,
            snapshot,
            new_name,
            no_start,
        } => {
            let info = c
                .clone_sandbox(
                    name,
                    &CloneRequest {
                        snapshot: snapshot.clone(),
                        name: new_name.clone(),
                        start: !no_start,
                    },
                )
                .await?;
            println!("{}", info.name);
        }
        // `run` sends only this group's commands here.
        _ => unreachable_command()?,
    }
    Ok(0)
}

/// The check, policy and approval commands.
async fn check_command(c: &Client, cmd: &Command) -> anyhow::Result<i32> {
    match cmd {
        Command::Check {
            name,
            command,
            format,
        } => {
            let check = c.check(Some(name), command).await?;
            return print_check(&check, *format);
        }
        Command::Policy(cmd) => return policy_command(c, cmd).await,
        Command::Approvals { all, format } => {
            let list = c.approvals(*all).await?;
            if *format == Format::Json {
                print_json(&list)?;
            } else {
                let rows: Vec<Vec<String>> = list
                    .iter()
                    .map(|a| {
                        vec![
                            a.id.clone(),
                            a.sandbox.clone(),
                            state_name(&a.state),
                            a.risk.clone(),
                            a.requested_by.clone(),
                            output::ago(&a.created_at),
                            a.command.clone(),
                            a.reasons.join("; "),
                        ]
                    })
                    .collect();
                output::table(
                    &[
                        "ID", "SANDBOX", "STATE", "RISK", "BY", "ASKED", "COMMAND", "REASONS",
                    ],
                    &rows,
                );
            }
        }
        Command::Approve { id } => {
            let a = c.decide(id, true, None).await?;
            eprintln!("approved {} ({} in {})", a.id, a.command, a.sandbox);
        }
        Command::Deny { id, reason } => {
            let a = c.decide(id, false, reason.as_deref()).await?;
            eprintln!("denied {} ({} in {})", a.id, a.command, a.sandbox);
        }
        // `run` sends only this group's commands here.
        _ => unreachable_command()?,
    }
    Ok(0)
}

/// The audit and log commands.
async fn audit_command(c: &Client, cmd: &Command) -> anyhow::Result<i32> {
    match cmd {
        Command::Audit(args) => match &args.command {
            Some(AuditCommand::Verify { head, format }) => {
                let v = c.verify_audit(head.as_deref()).await?;
                if *format == Format::Json {
                    print_json(&v)?;
                } else if v.ok {
                    println!("ok: {} records, the chain holds", v.records);
                    if let Some(p) = v.pruned_through {
                        println!(
                            "records 1 to {p} were pruned by retention, as its record in the chain says"
                        );
                    }
                    if let (Some(h), Some(seq)) = (&v.kept_head, v.kept_head_seq) {
                        let after = v.head_seq.map_or(0, |s| s - seq);
                        println!("kept head {h} is record {seq}; {after} records follow it");
                    }
                    if let (Some(h), Some(seq)) = (&v.head, v.head_seq) {
                        println!("head: {h} (record {seq})");
                    }
                } else {
                    match v.first_broken {
                        Some(seq) => println!(
                            "BROKEN at record {seq}: {} ({} records checked)",
                            v.problem.as_deref().unwrap_or("?"),
                            v.records
                        ),
                        None => println!(
                            "BROKEN: {} ({} records checked)",
                            v.problem.as_deref().unwrap_or("?"),
                            v.records
                        ),
                    }
                }
                return Ok(if v.ok { 0 } else { 1 });
            }
            None => {
                let records = c
                    .audit(
                        args.sandbox.as_deref(),
                        args.since.as_deref(),
                        Some(args.limit),
                    )
                    .await?;
                if args.format == Format::Json {
                    print_json(&records)?;
                } else {
                    let rows: Vec<Vec<String>> = records
                        .iter()
                        .map(|r| {
                            vec![
                                r.seq.to_string(),
                                output::time_ms(r.time),
                                r.actor.clone(),
                                r.action.clone(),
                                r.sandbox.clone().unwrap_or_else(|| "-".into()),
                                audit_summary(&r.detail),
                            ]
                        })
                        .collect();
                    output::table(
                        &["SEQ", "TIME", "ACTOR", "ACTION", "SANDBOX", "DETAIL"],
                        &rows,
                    );
                }
            }
        },
        Command::ExportLogs { name, output } => {
            let bytes = c.export_logs(name, output).await?;
            eprintln!("wrote {} ({})", output.display(), output::bytes(bytes));
        }
        // `run` sends only this group's commands here.
        _ => unreachable_command()?,
    }
    Ok(0)
}

/// `sandbox network`: show, change live, reset, log.
async fn network_command(c: &Client, args: &NetworkArgs) -> anyhow::Result<i32> {
    let (info, format) = match &args.command {
        None => {
            let name = args.name.as_deref().unwrap_or_default();
            (c.network(name).await?, args.format)
        }
        Some(NetworkCommand::Allow { name, rules }) => {
            (c.network_rules(name, true, rules).await?, Format::Table)
        }
        Some(NetworkCommand::Deny { name, rules }) => {
            (c.network_rules(name, false, rules).await?, Format::Table)
        }
        Some(NetworkCommand::Reset { name }) => (c.network_reset(name).await?, Format::Table),
        Some(NetworkCommand::Log {
            name,
            limit,
            format,
        }) => {
            let log = c.network_log(name, Some(*limit)).await?;
            if *format == Format::Json {
                print_json(&log)?;
            } else {
                let rows: Vec<Vec<String>> = log
                    .iter()
                    .map(|b| {
                        vec![
                            b.time.clone(),
                            b.kind.clone(),
                            b.target.clone(),
                            b.count.to_string(),
                        ]
                    })
                    .collect();
                output::table(&["TIME", "KIND", "TARGET", "COUNT"], &rows);
            }
            return Ok(0);
        }
    };
    if format == Format::Json {
        print_json(&info)?;
        return Ok(0);
    }
    let list = |v: &[String]| {
        if v.is_empty() {
            "-".to_string()
        } else {
            v.join(" ")
        }
    };
    println!("sandbox:  {}", info.sandbox);
    println!("mode:     {}", info.mode);
    println!(
        "allow:    {}{}",
        list(&info.allow),
        if info.changed {
            "   (changed live; `sandbox network reset` goes back to the spec's)"
        } else {
            ""
        }
    );
    println!("deny:     {}", list(&info.deny));
    println!("ports:    {}", list(&info.ports));
    println!(
        "address:  {}",
        info.address.as_deref().unwrap_or(if info.attached {
            "- (loopback only)"
        } else {
            "- (not running)"
        })
    );
    let k = &info.counters;
    println!(
        "counters: dns answered {}, dns refused {}, connections blocked {}, out {}, in {}",
        k.dns_answered,
        k.dns_refused,
        k.conns_blocked,
        output::bytes(k.bytes_out),
        output::bytes(k.bytes_in)
    );
    for a in &info.allowed_now {
        let left = a
            .seconds_left
            .map_or(String::new(), |s| format!(" for {s}s"));
        println!("reachable: {} ({}){left}", a.address, a.because);
    }
    Ok(0)
}

/// The image and pool commands; daemon and api are handled before connecting.
async fn image_command(c: &Client, cmd: &Command) -> anyhow::Result<i32> {
    match cmd {
        Command::Image(ImageCommand::Import { path, name }) => {
            let abs = std::fs::canonicalize(path)
                .with_context(|| format!("{} does not exist", path.display()))?;
            let shown =
                crate::progress::Progress::spinner(&format!("importing {}", path.display()));
            let img = c
                .import_image(&ImportImageRequest {
                    path: abs.display().to_string(),
                    name: name.clone(),
                })
                .await?;
            drop(shown);
            println!(
                "{} {} ({})",
                img.name,
                &img.id[..img.id.len().min(12)],
                output::bytes(img.size_bytes)
            );
        }
        Command::Image(ImageCommand::Ls { format }) => {
            let list = c.images().await?;
            if *format == Format::Json {
                print_json(&list)?;
            } else {
                let rows: Vec<Vec<String>> = list
                    .iter()
                    .map(|i| {
                        vec![
                            i.name.clone(),
                            i.id[..i.id.len().min(12)].to_string(),
                            i.format.clone(),
                            if i.id == "host" {
                                "-".into()
                            } else {
                                output::bytes(i.size_bytes)
                            },
                            if i.used_by.is_empty() {
                                "-".into()
                            } else {
                                i.used_by.join(",")
                            },
                        ]
                    })
                    .collect();
                output::table(&["NAME", "ID", "FORMAT", "SIZE", "USED BY"], &rows);
            }
        }
        Command::Image(ImageCommand::Rm { reference }) => c.remove_image(reference).await?,
        Command::Pool(PoolCommand::Info { format }) => {
            let p = c.pool().await?;
            if *format == Format::Json {
                print_json(&p)?;
            } else {
                let driver = serde_json::to_string(&p.driver)
                    .unwrap_or_default()
                    .trim_matches('"')
                    .to_string();
                let rows = vec![
                    vec!["driver".into(), driver],
                    vec!["path".into(), p.path.clone()],
                    vec![
                        "loop file".into(),
                        p.loop_file.clone().unwrap_or_else(|| "-".into()),
                    ],
                    vec!["size".into(), output::bytes(p.total_bytes)],
                    vec!["used".into(), output::bytes(p.used_bytes)],
                    vec!["free".into(), output::bytes(p.free_bytes)],
                ];
                output::table(&["POOL", ""], &rows);
            }
        }
        Command::Daemon { .. } | Command::Api(_) => unreachable_command()?,
        // `run` sends only this group's commands here.
        _ => unreachable_command()?,
    }
    Ok(0)
}

fn state_name<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v)
        .unwrap_or_default()
        .trim_matches('"')
        .to_string()
}

/// Prints a check; returns its exit code (0 allow, 2 approval, 3 deny).
fn print_check(check: &devbox_wire::Check, format: Format) -> anyhow::Result<i32> {
    use devbox_wire::Verdict;
    if format == Format::Json {
        print_json(check)?;
    } else {
        println!("decision: {}", state_name(&check.decision));
        println!("risk:     {}", state_name(&check.risk));
        for r in &check.reasons {
            println!("reason:   {r}");
        }
        for f in &check.findings {
            println!(
                "finding:  {} [{}] {}: {}",
                f.rule,
                state_name(&f.risk),
                f.command,
                f.reason
            );
        }
    }
    Ok(match check.decision {
        Verdict::Allow => 0,
        Verdict::RequireApproval => EXIT_APPROVAL.into(),
        Verdict::Deny => EXIT_DENIED.into(),
    })
}

async fn policy_command(c: &Client, cmd: &PolicyCommand) -> anyhow::Result<i32> {
    match cmd {
        PolicyCommand::Ls { sandbox, format } => {
            let list = c.policies(sandbox.as_deref()).await?;
            if *format == Format::Json {
                print_json(&list)?;
            } else {
                let rows: Vec<Vec<String>> = list
                    .iter()
                    .map(|p| {
                        vec![
                            p.name.clone(),
                            p.sandbox.clone().unwrap_or_else(|| "(global)".into()),
                            if p.builtin {
                                "built-in".into()
                            } else {
                                output::ago(&p.created_at)
                            },
                            p.rego
                                .lines()
                                .find(|l| l.trim_start().starts_with("package "))
                                .unwrap_or("")
                                .trim()
                                .to_string(),
                        ]
                    })
                    .collect();
                output::table(&["NAME", "SCOPE", "ADDED", "PACKAGE"], &rows);
            }
        }
        PolicyCommand::Add {
            name,
            file,
            sandbox,
        } => {
            let rego = std::fs::read_to_string(file)
                .with_context(|| format!("reading {}", file.display()))?;
            let p = c.put_policy(name, sandbox.as_deref(), &rego).await?;
            eprintln!(
                "policy {} added ({})",
                p.name,
                p.sandbox.as_deref().unwrap_or("global")
            );
        }
        PolicyCommand::Rm { name, sandbox } => c.delete_policy(name, sandbox.as_deref()).await?,
        PolicyCommand::Test {
            command,
            sandbox,
            file,
            name,
            format,
        } => {
            let candidate = match file {
                Some(f) => {
                    let rego = std::fs::read_to_string(f)
                        .with_context(|| format!("reading {}", f.display()))?;
                    let name = match name {
                        Some(n) => n.clone(),
                        None => f
                            .file_stem()
                            .map(|s| s.to_string_lossy().into_owned())
                            .unwrap_or_else(|| "candidate".into()),
                    };
                    Some((name, rego))
                }
                None => None,
            };
            let check = c
                .test_policy(
                    sandbox.as_deref(),
                    command,
                    candidate.as_ref().map(|(n, r)| (n.as_str(), r.as_str())),
                )
                .await?;
            return print_check(&check, *format);
        }
    }
    Ok(0)
}

/// One line about an audit record's details.
pub(crate) fn audit_summary(detail: &serde_json::Value) -> String {
    let Some(obj) = detail.as_object() else {
        return detail.to_string();
    };
    let mut parts = Vec::new();
    for (k, v) in obj {
        let v = match v {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Null => continue,
            other => other.to_string(),
        };
        let v: String = if v.chars().count() > 80 {
            format!("{}…", v.chars().take(79).collect::<String>())
        } else {
            v
        };
        parts.push(format!("{k}={v}"));
    }
    parts.join(" ")
}

fn unreachable_command() -> anyhow::Result<()> {
    bail!("this command is handled before connecting to the daemon")
}

/// Prints snapshots as a tree (children under their parent, oldest first); `*` marks the
/// head: the snapshot the current state descends from.
fn print_tree(snaps: &[SnapshotInfo]) {
    fn walk(
        snaps: &[SnapshotInfo],
        parent: Option<&str>,
        depth: usize,
        rows: &mut Vec<Vec<String>>,
    ) {
        for s in snaps.iter().filter(|s| s.parent.as_deref() == parent) {
            let mut notes = Vec::new();
            if s.auto {
                notes.push("auto".to_string());
            }
            if s.processes {
                notes.push("+processes".to_string());
            }
            notes.extend(s.labels.iter().map(|(k, v)| format!("{k}={v}")));
            if !s.clones.is_empty() {
                notes.push(format!("clones: {}", s.clones.join(",")));
            }
            if let Some(m) = &s.message {
                notes.push(format!("\"{m}\""));
            }
            rows.push(vec![
                format!(
                    "{}{}{}",
                    "  ".repeat(depth),
                    if s.head { "* " } else { "" },
                    s.name
                ),
                s.size_bytes
                    .map(output::bytes)
                    .unwrap_or_else(|| "-".into()),
                output::ago(&s.created_at),
                notes.join(" "),
            ]);
            walk(snaps, Some(&s.name), depth + 1, rows);
        }
    }
    let mut rows = Vec::new();
    walk(snaps, None, 0, &mut rows);
    output::table(&["SNAPSHOT", "SIZE", "TAKEN", "NOTES"], &rows);
}
