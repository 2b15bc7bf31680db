//! Command-line arguments.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use devbox_spec::{NetRule, NetworkMode, PortMap};

/// dev-box: isolated sandboxes that start in milliseconds.
///
/// The CLI talks to the dev-box daemon over a root-only Unix socket and starts the daemon
/// when none runs: run it as root (or as a member of the group the daemon names). With
/// --host (DEVBOX_HOST), it talks to a daemon over TCP with a token (DEVBOX_TOKEN) instead.
#[derive(Debug, Parser)]
#[command(
    name = "sandbox",
    version,
    propagate_version = true,
    max_term_width = 100
)]
pub struct Cli {
    /// The daemon's socket.
    #[arg(long, global = true, env = "DEVBOX_SOCKET", value_name = "PATH")]
    pub socket: Option<PathBuf>,

    /// A daemon over TCP: https://HOST:PORT (or http://127.0.0.1:PORT, unix:///PATH).
    #[arg(long, global = true, env = "DEVBOX_HOST", value_name = "URL")]
    pub host: Option<String>,

    /// The API token for --host (better given as DEVBOX_TOKEN: arguments are visible to
    /// other users in `ps`).
    #[arg(
        long,
        global = true,
        env = "DEVBOX_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,

    /// Certificates (PEM) to trust for --host besides the web's roots, e.g. the daemon's
    /// own self-signed certificate.
    #[arg(long, global = true, env = "DEVBOX_CA_CERT", value_name = "FILE")]
    pub ca_cert: Option<PathBuf>,

    /// Persistent state (database, storage pool) of the daemon this CLI starts.
    #[arg(
        long,
        global = true,
        env = "DEVBOX_STATE_DIR",
        value_name = "DIR",
        default_value = "/var/lib/dev-box"
    )]
    pub state_dir: PathBuf,

    /// Runtime state (socket, mount points) of the daemon this CLI starts.
    #[arg(
        long,
        global = true,
        env = "DEVBOX_RUNTIME_DIR",
        value_name = "DIR",
        default_value = "/run/dev-box"
    )]
    pub runtime_dir: PathBuf,

    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// The socket to use.
    pub fn socket_path(&self) -> PathBuf {
        self.socket
            .clone()
            .unwrap_or_else(|| self.runtime_dir.join("api.sock"))
    }
}

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Aligned columns for people.
    Table,
    /// JSON for scripts.
    Json,
}

/// Settings of a new sandbox.
#[derive(Debug, Clone, Args)]
pub struct SandboxOpts {
    /// A Sandbox spec (YAML or JSON, apiVersion sandbox.io/v1); flags override its fields.
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// Image: `host` (default: the host's system, read-only) or an imported image.
    #[arg(long)]
    pub image: Option<String>,
    /// Memory limit (e.g. 512Mi, 2Gi). Default 1Gi.
    #[arg(long, value_name = "SIZE")]
    pub memory: Option<String>,
    /// CPU limit in CPUs (e.g. 2, 0.5, 500m). Default 1.
    #[arg(long, value_name = "CPUS")]
    pub cpus: Option<String>,
    /// Most processes and threads. Default 1024.
    #[arg(long, value_name = "N")]
    pub pids: Option<u64>,
    /// Disk quota of the writable layer (e.g. 10Gi; btrfs pools only). Default: none.
    #[arg(long, value_name = "SIZE")]
    pub disk: Option<String>,
    /// Default timeout of every exec (e.g. 30s, 5m): the command and everything it started
    /// are killed then, exit code 124. Default: none.
    #[arg(long, value_name = "DURATION")]
    pub exec_timeout: Option<String>,
    /// Environment for every command (repeatable).
    #[arg(short = 'e', long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Label (repeatable).
    #[arg(short = 'l', long = "label", value_name = "KEY=VALUE")]
    pub labels: Vec<String>,
    /// Default working directory of commands.
    #[arg(short = 'w', long)]
    pub workdir: Option<String>,
    /// Default user of commands.
    #[arg(short = 'u', long)]
    pub user: Option<String>,
    /// Hostname (default: the sandbox's name).
    #[arg(long)]
    pub hostname: Option<String>,
    /// Take a snapshot before every exec (recorded in the spec).
    #[arg(long)]
    pub auto_snapshot: bool,
    /// The sandbox's main process (shell text), started whenever the sandbox starts and
    /// after a rollback; its output goes to logs/NAME/main.log in the state dir.
    #[arg(long = "main", value_name = "TEXT")]
    pub main_command: Option<String>,
    /// Network mode (default none: loopback only).
    #[arg(long, value_enum, value_name = "MODE")]
    pub network: Option<NetMode>,
    /// Allow egress to a name (pypi.org), a wildcard (*.npmjs.org), an address or network
    /// (10.1.2.0/24, [2001:db8::/32]), optionally with a port (example.com:443,
    /// 10.1.2.0/24:443); needs --network allow (repeatable).
    #[arg(long = "allow", value_name = "RULE", value_parser = parse_rule)]
    pub allow: Vec<NetRule>,
    /// Deny egress (same forms as --allow; wins over allow rules); with --network allow or
    /// open (repeatable).
    #[arg(long = "deny", value_name = "RULE", value_parser = parse_rule)]
    pub deny: Vec<NetRule>,
    /// Publish a TCP port: connections to HOST (on ADDR, default every IPv4 address) on the
    /// host reach port SANDBOX inside; any network mode (repeatable).
    #[arg(short = 'p', long = "publish", value_name = "[ADDR:]HOST:SANDBOX", value_parser = parse_port_map)]
    pub publish: Vec<PortMap>,
}

/// Network modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum NetMode {
    /// Loopback only (published ports still reach the sandbox).
    None,
    /// Egress only to what --allow lists; names resolve through the daemon's DNS.
    Allow,
    /// Egress anywhere but what --deny lists (and the host, and 169.254.0.0/16).
    Open,
}

impl From<NetMode> for NetworkMode {
    fn from(m: NetMode) -> Self {
        match m {
            NetMode::None => NetworkMode::None,
            NetMode::Allow => NetworkMode::Allow,
            NetMode::Open => NetworkMode::Open,
        }
    }
}

fn parse_rule(s: &str) -> Result<NetRule, String> {
    NetRule::parse(s)
}

fn parse_port_map(s: &str) -> Result<PortMap, String> {
    PortMap::parse(s)
}

/// How a command runs.
#[derive(Debug, Clone, Args)]
pub struct ExecOpts {
    /// Pass stdin to the command (without it, the command's stdin is empty, as with docker
    /// and podman, so `while read ...; do sandbox exec ...; done` keeps its input).
    #[arg(short = 'i', long)]
    pub interactive: bool,
    /// Allocate a terminal (`-it` for an interactive shell).
    #[arg(short = 't', long)]
    pub tty: bool,
    /// Environment variable (repeatable).
    #[arg(short = 'e', long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Working directory.
    #[arg(short = 'w', long)]
    pub workdir: Option<String>,
    /// User: name, uid, user:group or uid:gid.
    #[arg(short = 'u', long)]
    pub user: Option<String>,
    /// Take a snapshot first; roll back to it if the command exits non-zero.
    #[arg(long)]
    pub rollback_on_failure: bool,
    /// Kill the command and everything it started (also daemonized children) after this
    /// long (e.g. 30s, 5m, 500ms); exits 124 then. Default: the sandbox's execTimeout.
    #[arg(long, value_name = "DURATION")]
    pub timeout: Option<String>,
    /// If the command needs an approval, do not wait: print its id and exit 2 (it stays
    /// pending; once approved, run the command again with --approval ID).
    #[arg(long, conflicts_with = "wait")]
    pub no_wait: bool,
    /// If the command needs an approval, wait at most this long (e.g. 5m), then withdraw
    /// it and exit 2. Default: until it is decided or expires.
    #[arg(long, value_name = "DURATION")]
    pub wait: Option<String>,
    /// Run the command with this approval (approved, for exactly this command).
    #[arg(long, value_name = "ID")]
    pub approval: Option<String>,
}

/// Commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a sandbox and start it.
    Create {
        /// Name: lowercase letters, digits, '-', '_', '.'; at most 63 characters.
        name: Option<String>,
        #[command(flatten)]
        opts: SandboxOpts,
        /// Create it stopped.
        #[arg(long)]
        no_start: bool,
    },
    /// Run a command in a running sandbox; exits with the command's exit code.
    ///
    /// One argument after the name runs through `/bin/sh -c` (`sandbox exec dev "make && make test"`);
    /// after `--`, arguments are the program and its arguments (`sandbox exec dev -- ls -la /work`).
    #[command(trailing_var_arg = true)]
    Exec {
        #[command(flatten)]
        opts: ExecOpts,
        /// The sandbox.
        name: String,
        /// The command.
        #[arg(required = true, allow_hyphen_values = true, value_name = "COMMAND")]
        command: Vec<String>,
    },
    /// Create a sandbox, run one command in it; with --rm, destroy it afterwards.
    #[command(trailing_var_arg = true)]
    Run {
        /// Destroy the sandbox when the command ends (also when interrupted).
        #[arg(long)]
        rm: bool,
        /// Name of the sandbox (default: generated).
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        sandbox: SandboxOpts,
        /// Pass stdin to the command (without it, the command's stdin is empty).
        #[arg(short = 'i', long)]
        interactive: bool,
        /// Allocate a terminal.
        #[arg(short = 't', long)]
        tty: bool,
        /// The command (as for exec).
        #[arg(required = true, allow_hyphen_values = true, value_name = "COMMAND")]
        command: Vec<String>,
    },
    /// List sandboxes.
    #[command(alias = "list")]
    Ls {
        /// Output format.
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
        /// Only names.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Show resource use of sandboxes: CPU %, memory (use, limit, peak), pids, disk, network.
    ///
    /// Without names: every running sandbox. CPU % is averaged since the daemon's previous
    /// sample of the sandbox (0.1 to 10 s ago); without one, the call samples again after
    /// 0.1 s. Network bytes are those of the sandbox's link (every packet, DNS too); none
    /// for a sandbox without a network link.
    Stats {
        /// The sandboxes (default: every running one).
        names: Vec<String>,
        /// Keep showing, redrawn every --interval on a terminal (printed again on a pipe).
        #[arg(short, long)]
        watch: bool,
        /// Seconds between two redraws of --watch.
        #[arg(long, default_value_t = 2.0, value_name = "SECONDS")]
        interval: f64,
        /// Output format (json: one document per round; with --watch, one line each).
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Show the processes inside a running sandbox and the exec each belongs to.
    ///
    /// PID and USER are as inside the sandbox. EXEC is the exec's id (as in its
    /// `exec` audit record); HOW says how it is known: exec (its command), cgroup (the exec's own cgroup,
    /// execs with a timeout), session, ancestry, init (the sandbox's pid 1), or unknown (it
    /// left its exec's session and was orphaned, or its exec ended). Commands are shown with
    /// control characters escaped, at most 1024 characters.
    Ps {
        /// The sandbox.
        name: String,
        /// Output format.
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Show events: lifecycle, exec, snapshot, rollback, limit (OOM kills, pids limit hits),
    /// network (blocked attempts), approval, policy, health, alert, idle, ...
    ///
    /// Every audit record is an event; its id is the record's sequence number. With
    /// --follow, the events since --since (none without it) and then new ones as they happen;
    /// a stream that ends is resumed after the last id seen.
    Events {
        /// Only this sandbox's events.
        #[arg(long)]
        sandbox: Option<String>,
        /// Only events since a time (2026-11-28T10:00:00Z) or a duration ago (10m, 1h).
        #[arg(long)]
        since: Option<String>,
        /// Only events of these kinds (comma-separated, e.g. alert,limit).
        #[arg(long, value_name = "KINDS")]
        kind: Option<String>,
        /// Keep following new events.
        #[arg(short, long)]
        follow: bool,
        /// At most this many past events (the newest).
        #[arg(long, default_value_t = 1000)]
        limit: usize,
        /// Output format (json: one object per line).
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Make, list and revoke API tokens for callers over TCP (sandboxd --listen).
    #[command(subcommand)]
    Token(TokenCommand),
    /// Show the daemon's webhooks and their delivery state.
    Webhooks {
        /// Output format.
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Show a sandbox as JSON: spec, state, processes, times, resource and storage use.
    Inspect {
        /// The sandbox.
        name: String,
    },
    /// Change a sandbox's limits; a running sandbox gets them at once, without a restart.
    ///
    /// Nothing changes unless every value can be applied: memory, pids and disk are not
    /// lowered below what the sandbox uses now. `none` lifts the disk quota or exec timeout.
    Update {
        /// The sandbox.
        name: String,
        /// Memory limit (e.g. 2Gi).
        #[arg(long, value_name = "SIZE")]
        memory: Option<String>,
        /// CPU limit in CPUs (e.g. 2, 0.5, 500m).
        #[arg(long, value_name = "CPUS")]
        cpus: Option<String>,
        /// Most processes and threads.
        #[arg(long, value_name = "N")]
        pids: Option<u64>,
        /// Disk quota of the writable layer (e.g. 20Gi, or none; btrfs pools only).
        #[arg(long, value_name = "SIZE")]
        disk: Option<String>,
        /// Default exec timeout (e.g. 5m, or none).
        #[arg(long, value_name = "DURATION")]
        exec_timeout: Option<String>,
    },
    /// Start a stopped sandbox.
    Start {
        /// The sandbox.
        name: String,
    },
    /// Stop a sandbox: SIGTERM to every process, SIGKILL after the grace period. Files stay.
    Stop {
        /// The sandbox.
        name: String,
        /// Seconds to wait before SIGKILL.
        #[arg(short = 't', long = "time", default_value_t = 10.0)]
        time: f64,
    },
    /// Destroy sandboxes: stop them, then remove their processes, mounts, cgroups and storage.
    #[command(alias = "rm")]
    Destroy {
        /// The sandboxes.
        #[arg(required = true)]
        names: Vec<String>,
        /// Kill at once, without a grace period.
        #[arg(short, long)]
        force: bool,
    },
    /// Take a snapshot of a sandbox (or: snapshot rm / export / import).
    ///
    /// A running sandbox is frozen for the instant of the snapshot. Without a name, the
    /// snapshot gets a time-ordered one (s-YYYYMMDD-HHMMSS-mmm).
    Snapshot(SnapshotArgs),
    /// Show a sandbox's network (mode, rules, ports, address, counters), or change its
    /// rules live (network allow / deny / reset), or show blocked attempts (network log).
    Network(NetworkArgs),
    /// Show a sandbox's snapshots as a tree: parents, branches, sizes, times, labels.
    Snapshots {
        /// The sandbox.
        name: String,
        /// Output format.
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Show what changed between two states of a sandbox (A added, M modified, D deleted).
    Diff {
        /// The sandbox.
        name: String,
        /// The older state: a snapshot, `latest`, or `image` (default: the snapshot the current
        /// state descends from).
        #[arg(long)]
        from: Option<String>,
        /// The newer state: a snapshot, `latest`, or `current` (default).
        #[arg(long)]
        to: Option<String>,
        /// Output format.
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Roll a sandbox back to a snapshot, in place: same sandbox, same name, files as they were.
    ///
    /// A running sandbox is stopped (its processes killed), its files replaced, and started
    /// again. With --path, only those paths are restored.
    Rollback {
        /// The sandbox.
        name: String,
        /// The snapshot: a name, an id, or `latest`.
        #[arg(long)]
        to: String,
        /// Restore only this path (repeatable).
        #[arg(long = "path", value_name = "PATH")]
        paths: Vec<String>,
    },
    /// Make a new sandbox from a snapshot of another.
    Clone {
        /// The sandbox.
        name: String,
        /// The snapshot: a name, an id, or `latest`.
        snapshot: String,
        /// The new sandbox's name.
        new_name: String,
        /// Create it stopped.
        #[arg(long)]
        no_start: bool,
    },
    /// Check a command against the rules and policies without running it.
    ///
    /// Prints the decision, the risk and the reasons. Exit code: 0 allow, 2 needs approval,
    /// 3 deny.
    Check {
        /// The sandbox whose policies, spec and labels apply.
        name: String,
        /// The command, as shell text.
        command: String,
        /// Output format (json includes every finding and each policy's decision).
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Manage policies: Rego modules that decide allow, require_approval or deny.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// List approvals: commands that wait for someone's decision.
    Approvals {
        /// Decided and expired ones too.
        #[arg(short, long)]
        all: bool,
        /// Output format.
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Approve a waiting command: it runs (once).
    Approve {
        /// The approval's id.
        id: String,
    },
    /// Deny a waiting command: it does not run.
    Deny {
        /// The approval's id.
        id: String,
        /// Why (recorded and shown to whoever waits).
        #[arg(long)]
        reason: Option<String>,
    },
    /// Show the audit log (oldest first), or verify its hash chain.
    Audit(AuditArgs),
    /// Pack a sandbox's exec logs (stdout, stderr, exit codes, durations, resource use) and
    /// its audit records into a .tar.gz.
    ExportLogs {
        /// The sandbox (it may have been destroyed; its records remain).
        name: String,
        /// The archive to write.
        #[arg(short, long, value_name = "FILE")]
        output: PathBuf,
    },
    /// Manage images.
    #[command(subcommand)]
    Image(ImageCommand),
    /// The storage pool.
    #[command(subcommand)]
    Pool(PoolCommand),
    /// The REST API.
    #[command(subcommand)]
    Api(ApiCommand),
    /// Run the daemon (`sandboxd`) in the foreground (the CLI starts it on demand).
    Daemon {
        /// Size of a new loop-file storage pool (default: a fifth of the free disk, 4-100 GiB).
        #[arg(long, value_name = "SIZE", env = "DEVBOX_POOL_SIZE")]
        pool_size: Option<String>,
    },
}

/// `sandbox snapshot`: take one, or manage them.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct SnapshotArgs {
    /// What to do, other than taking a snapshot.
    #[command(subcommand)]
    pub command: Option<SnapshotCommand>,
    /// The sandbox.
    #[arg(required = true)]
    pub name: Option<String>,
    /// Name of the snapshot.
    pub snapshot: Option<String>,
    /// A message.
    #[arg(short, long)]
    pub message: Option<String>,
    /// Label (repeatable).
    #[arg(short = 'l', long = "label", value_name = "KEY=VALUE")]
    pub labels: Vec<String>,
    /// Also checkpoint the running processes (CRIU ≥ 4.1): a rollback to this snapshot
    /// restores them running. Every exec must have ended (background processes are fine).
    /// In a sandbox with a network, established TCP connections come back closed.
    #[arg(long)]
    pub with_processes: bool,
}

/// `sandbox network`: show a sandbox's network, or change it.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct NetworkArgs {
    /// What to do, other than showing the network.
    #[command(subcommand)]
    pub command: Option<NetworkCommand>,
    /// The sandbox.
    #[arg(required = true)]
    pub name: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    pub format: Format,
}

/// Live network changes and the log of blocked attempts.
#[derive(Debug, Subcommand)]
pub enum NetworkCommand {
    /// Allow more egress now (from the next connection or DNS question); the change is kept
    /// across restarts, snapshots and clones, and audited (network.allow).
    Allow {
        /// The sandbox.
        name: String,
        /// Rules: pypi.org, *.npmjs.org, 10.1.2.0/24, example.com:443, [2001:db8::/32].
        #[arg(required = true, value_name = "RULE")]
        rules: Vec<String>,
    },
    /// Deny egress now (deny rules win over allow rules); kept and audited like allow.
    Deny {
        /// The sandbox.
        name: String,
        /// Rules, as for allow.
        #[arg(required = true, value_name = "RULE")]
        rules: Vec<String>,
    },
    /// Drop the live changes: the spec's rules apply again (audited as network.reset).
    Reset {
        /// The sandbox.
        name: String,
    },
    /// Show blocked attempts: names the DNS refused and connections refused, oldest first.
    Log {
        /// The sandbox.
        name: String,
        /// At most this many entries (the newest).
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Output format.
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
}

/// Snapshot management.
#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Delete a snapshot (refused while a sandbox cloned from it exists, unless --force).
    Rm {
        /// The sandbox.
        name: String,
        /// The snapshot.
        snapshot: String,
        /// Delete it even so.
        #[arg(short, long)]
        force: bool,
    },
    /// Write a snapshot to a portable archive (zstd tar with a manifest and a digest).
    Export {
        /// The sandbox.
        name: String,
        /// The snapshot (or `latest`).
        snapshot: String,
        /// The archive to write.
        #[arg(short, long, value_name = "FILE")]
        output: PathBuf,
    },
    /// Make a sandbox from a snapshot archive (its image must be here); it is created stopped.
    Import {
        /// The archive.
        file: PathBuf,
        /// Name of the new sandbox (default: the name in the archive).
        #[arg(long)]
        name: Option<String>,
        /// Start it.
        #[arg(long)]
        start: bool,
    },
}

/// `sandbox audit`: list records, or verify the chain.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct AuditArgs {
    /// Verify instead of listing.
    #[command(subcommand)]
    pub command: Option<AuditCommand>,
    /// Only this sandbox's records.
    #[arg(long)]
    pub sandbox: Option<String>,
    /// Only records since a time (2026-11-28T10:00:00Z) or a duration ago (1h, 30m, 2days).
    #[arg(long)]
    pub since: Option<String>,
    /// At most this many records (the newest).
    #[arg(long, default_value_t = 1000)]
    pub limit: usize,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    pub format: Format,
}

/// Audit subcommands.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check the hash chain: every record links to the one before and hashes to what it
    /// says, and the chain starts where retention's own record says it pruned to. Prints
    /// the head (the newest record's hash): keep it elsewhere and check later with --head.
    /// Exits 1 and names the first broken record if it does not hold.
    Verify {
        /// A head printed by an earlier verify and kept elsewhere: the chain must still reach
        /// it (this reveals a rewritten log and records cut from its end).
        #[arg(long, value_name = "HASH")]
        head: Option<String>,
        /// Output format.
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
}

/// Policy commands.
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// List the policies (the built-in default, global ones, each sandbox's).
    #[command(alias = "list")]
    Ls {
        /// Only those applying to this sandbox (its own and the global ones).
        #[arg(long)]
        sandbox: Option<String>,
        /// Output format (json includes the Rego text).
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Add or replace a policy. It is refused if it does not compile.
    ///
    /// A policy is a Rego module that defines `decision` ("allow", "require_approval" or
    /// "deny") and may define a set `reasons`. Its input: `commands` (the parsed commands),
    /// `findings` (what the built-in rules found), `risk`, `text`, `parse_errors`, `sandbox`
    /// (name, labels, spec) and `actor`. The most restrictive decision of all policies wins.
    /// A global policy named `default` replaces the built-in one.
    Add {
        /// The policy's name.
        name: String,
        /// The Rego file.
        #[arg(short = 'f', long = "file", value_name = "FILE")]
        file: PathBuf,
        /// Only for this sandbox (default: every sandbox).
        #[arg(long)]
        sandbox: Option<String>,
    },
    /// Remove a policy.
    Rm {
        /// The policy's name.
        name: String,
        /// The sandbox it belongs to (default: the global one).
        #[arg(long)]
        sandbox: Option<String>,
    },
    /// Show what the policies decide for a command, and why; nothing runs.
    ///
    /// With -f, the decision is taken as if that policy were installed. Exit code: 0 allow,
    /// 2 needs approval, 3 deny.
    Test {
        /// The command, as shell text.
        #[arg(long)]
        command: String,
        /// The sandbox whose policies, spec and labels apply (default: global policies).
        #[arg(long)]
        sandbox: Option<String>,
        /// A policy file to try (not installed).
        #[arg(short = 'f', long = "file", value_name = "FILE")]
        file: Option<PathBuf>,
        /// The name the tried policy would have (default: the file's stem).
        #[arg(long)]
        name: Option<String>,
        /// Output format.
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
}

/// Token commands.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Make a token; prints it once (the daemon keeps only a hash).
    Create {
        /// Its name (the audit log's actor: token:NAME).
        name: String,
        /// What it may do: read, exec, approve, admin (comma-separated).
        #[arg(long, value_name = "SCOPES", default_value = "read")]
        scope: String,
        /// Only sandboxes whose names match this pattern (`*` and `?` as wildcards).
        #[arg(long, value_name = "PATTERN")]
        sandbox: Option<String>,
        /// Expires after this long (30d, 12h, 90m; default: never).
        #[arg(long, value_name = "DURATION")]
        expires: Option<String>,
        /// Its own rate: requests a second on average (default: the daemon's).
        #[arg(long, value_name = "N")]
        rate: Option<f64>,
        /// Its own cap on execs running at once (default: the daemon's).
        #[arg(long, value_name = "N")]
        max_execs: Option<u32>,
        /// Output format (json: the token and what was stored).
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// List tokens (never their secrets).
    Ls {
        /// Output format.
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Revoke tokens: their next request is refused.
    Revoke {
        /// The tokens.
        #[arg(required = true)]
        names: Vec<String>,
    },
}

/// Image commands.
#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Import a rootfs tarball or directory, an OCI image layout, or a `docker save` archive.
    Import {
        /// The file or directory (on the daemon's host).
        path: PathBuf,
        /// Name for the image.
        #[arg(long)]
        name: Option<String>,
    },
    /// List images.
    #[command(alias = "list")]
    Ls {
        /// Output format.
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Remove an image (refused while a sandbox uses it).
    Rm {
        /// Name or id (or a unique id prefix).
        reference: String,
    },
}

/// Pool commands.
#[derive(Debug, Subcommand)]
pub enum PoolCommand {
    /// Show the pool's driver, size and use.
    Info {
        /// Output format.
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
}

/// API commands.
#[derive(Debug, Subcommand)]
pub enum ApiCommand {
    /// Print the OpenAPI document.
    Openapi,
}
