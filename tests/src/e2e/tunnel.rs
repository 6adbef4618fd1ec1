//! Starting the real server and agent and waiting until the tunnel is ready.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use fluidity_runtime_smol::pki::CertPaths;
use tempfile::TempDir;

use super::bin::binaries;
use super::proc::{wait_for, Proc};

/// How long a binary may take to come up (a cold debug build on a busy machine is slow).
const START_LIMIT: Duration = Duration::from_secs(30);

/// Attempts at starting a binary whose freshly picked port was taken in the meantime.
const START_ATTEMPTS: usize = 5;

/// The egress rule that lets the server reach the origins on this machine.
pub const ALLOW_LOOPBACK: &str = "allow_cidrs=127.0.0.1/32";

/// A port that was free a moment ago on 127.0.0.1. Another process may take it before it
/// is used, so starting a binary on it is retried.
pub fn free_port() -> u16 {
    let [port] = free_ports();
    port
}

/// `N` distinct ports that were free a moment ago on 127.0.0.1. They are held together
/// while picked: ports picked one after another may be the same port, since the kernel
/// may hand a just-released port out again.
pub fn free_ports<const N: usize>() -> [u16; N] {
    let held: [TcpListener; N] =
        std::array::from_fn(|_| TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0"));
    held.map(|l| l.local_addr().expect("a bound port's address").port())
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Generates a CA and certificates with the real `fluidity certs init`.
pub fn certs_init(dir: &Path) -> CertPaths {
    let out = Command::new(&binaries().agent)
        .args(["certs", "init", "--dir"])
        .arg(dir)
        .env("NO_COLOR", "1")
        .output()
        .expect("running fluidity certs init");
    assert!(
        out.status.success(),
        "fluidity certs init failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let paths = CertPaths::in_dir(dir);
    for p in [
        &paths.ca_cert,
        &paths.server_cert,
        &paths.server_key,
        &paths.client_cert,
        &paths.client_key,
    ] {
        assert!(p.is_file(), "certs init did not write {}", p.display());
    }
    paths
}

/// One plain HTTP/1.1 GET to `addr` (no proxy), returning status and body. For the
/// server's health listener.
pub fn plain_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status line in {text:?}")))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// How to start a server.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// `--egress` rules. Default: [`ALLOW_LOOPBACK`].
    pub egress: Vec<String>,
    /// Contents of a TOML config file passed with `--config`, if any.
    pub config: Option<String>,
    /// Extra `FLUIDITY_LOG` filter, e.g. `debug`.
    pub log: Option<String>,
    /// The tunnel listener; default: a free port on 127.0.0.1 (a fixed address is for
    /// bringing a server back where an agent expects it).
    pub listen: Option<SocketAddr>,
    /// Extra command-line arguments (e.g. `--auth iam`).
    pub args: Vec<String>,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
    /// Remove every inherited `AWS_*` variable first, so only what `env` sets reaches the
    /// process (the developer's own AWS configuration must not).
    pub clear_aws_env: bool,
    /// The contents of an `/etc/hosts` the server sees instead of this machine's, for
    /// names with the addresses a test needs. The server then runs in mount and user
    /// namespaces of its own (`unshare`, util-linux); its network is this machine's.
    pub hosts: Option<String>,
    /// The contents of an `/etc/resolv.conf` the server sees instead of this machine's
    /// (a DNS server the test controls), in namespaces as for `hosts`; the server then
    /// also sees an `/etc/nsswitch.conf` of `hosts: files dns`, so that its lookups go
    /// to that DNS server whatever this machine's resolver setup (systemd-resolved, a
    /// cache).
    pub resolv_conf: Option<String>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            egress: vec![ALLOW_LOOPBACK.to_owned()],
            config: None,
            log: None,
            listen: None,
            args: Vec::new(),
            env: Vec::new(),
            clear_aws_env: false,
            hosts: None,
            resolv_conf: None,
        }
    }
}

/// A command that runs `binary`, seeing `hosts` as its `/etc/hosts` and `resolv` as its
/// `/etc/resolv.conf` where given (with an `/etc/nsswitch.conf` of `hosts: files dns`
/// beside the latter), written to files named `prefix` + the file's name: it then runs in mount and user namespaces of its own
/// (`unshare`, util-linux), with this machine's network.
fn command_with_files(
    binary: &Path,
    hosts: Option<&str>,
    resolv: Option<&str>,
    prefix: PathBuf,
) -> Command {
    let mut script = String::new();
    let mut files = Vec::new();
    let nsswitch = resolv.map(|_| "hosts: files dns\n");
    for (text, target) in [
        (hosts, "/etc/hosts"),
        (resolv, "/etc/resolv.conf"),
        (nsswitch, "/etc/nsswitch.conf"),
    ] {
        let Some(text) = text else { continue };
        let name = Path::new(target).file_name().expect("a file name");
        let mut file = prefix.clone().into_os_string();
        file.push(name);
        std::fs::write(&file, text).expect("writing a file for /etc");
        files.push(file);
        script.push_str(&format!("mount --bind \"${}\" {target} && ", files.len()));
    }
    if files.is_empty() {
        return Command::new(binary);
    }
    script.push_str(&format!("shift {} && exec \"$@\"", files.len()));
    // unshare execs the shell, which execs the binary: the process the test holds is
    // the binary's.
    let mut cmd = Command::new("unshare");
    cmd.args(["--user", "--map-root-user", "--mount", "sh", "-c"])
        .arg(script)
        .arg("sh")
        .args(files)
        .arg(binary);
    cmd
}

/// Removes every `AWS_*` variable `cmd` would inherit.
fn clear_aws_env(cmd: &mut Command) {
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("AWS_") {
            cmd.env_remove(k);
        }
    }
}

impl ServerOptions {
    /// The server's default egress policy: private and loopback targets refused.
    pub fn default_policy() -> Self {
        ServerOptions {
            egress: Vec::new(),
            ..ServerOptions::default()
        }
    }
}

/// A running `fluidity-server`.
#[derive(Debug)]
pub struct Server {
    /// The process.
    pub proc: Proc,
    /// The tunnel listener.
    pub listen: SocketAddr,
    /// The health and metrics listener.
    pub health: SocketAddr,
}

impl Server {
    /// Starts a server with the certificates in `certs` and waits until `/healthz`
    /// answers 200. Logs go to `log_dir`.
    pub fn start(certs: &CertPaths, opts: &ServerOptions, log_dir: &Path) -> Server {
        let config = opts.config.as_ref().map(|text| {
            let p = log_dir.join("server.toml");
            std::fs::write(&p, text).expect("writing the server config");
            p
        });
        for attempt in 1..=START_ATTEMPTS {
            let [listen_port, health_port] = free_ports();
            let listen = opts.listen.unwrap_or_else(|| loopback(listen_port));
            let health = loopback(health_port);
            let mut cmd = command_with_files(
                &binaries().server,
                opts.hosts.as_deref(),
                opts.resolv_conf.as_deref(),
                log_dir.join(""),
            );
            if let Some(p) = &config {
                cmd.arg("--config").arg(p);
            }
            cmd.arg("--listen")
                .arg(listen.to_string())
                .arg("--health-listen")
                .arg(health.to_string())
                .arg("--cert")
                .arg(&certs.server_cert)
                .arg("--key")
                .arg(&certs.server_key)
                .arg("--client-ca")
                .arg(&certs.ca_cert);
            for rule in &opts.egress {
                cmd.arg("--egress").arg(rule);
            }
            cmd.args(&opts.args);
            if opts.clear_aws_env {
                clear_aws_env(&mut cmd);
            }
            cmd.envs(opts.env.iter().map(|(k, v)| (k, v)));
            if let Some(f) = &opts.log {
                cmd.env("FLUIDITY_LOG", f);
            }
            let mut proc = Proc::spawn("fluidity-server", cmd, log_dir);
            let deadline = Instant::now() + START_LIMIT;
            loop {
                if let Ok((200, _)) = plain_get(health, "/healthz") {
                    return Server {
                        proc,
                        listen,
                        health,
                    };
                }
                if let Some(status) = proc.exited() {
                    let log = proc.log();
                    assert!(
                        attempt < START_ATTEMPTS && log.contains("bind"),
                        "fluidity-server exited ({status}) while starting:\n{log}"
                    );
                    break; // A port was taken: retry with new ones.
                }
                if Instant::now() >= deadline {
                    proc.print_log();
                    panic!("fluidity-server did not answer /healthz within {START_LIMIT:?}");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        unreachable!("the last attempt panics or returns")
    }

    /// The Prometheus text of `/metrics`.
    pub fn metrics(&self) -> String {
        match plain_get(self.health, "/metrics") {
            Ok((200, body)) => body,
            other => panic!("GET /metrics: {other:?}"),
        }
    }

    /// One unlabelled metric's value, e.g. `fluidity_tunnels_total`.
    pub fn metric(&self, name: &str) -> f64 {
        let text = self.metrics();
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .find_map(|l| {
                let (k, v) = l.split_once(' ')?;
                (k == name).then(|| v.trim().parse().ok()).flatten()
            })
            .unwrap_or_else(|| panic!("metric {name} not in /metrics:\n{text}"))
    }
}

/// A running agent (`fluidity run`).
#[derive(Debug)]
pub struct Agent {
    /// The process.
    pub proc: Proc,
    /// The proxy listener.
    pub listen: SocketAddr,
}

/// How to start an agent.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// The process and log file name. Default `fluidity` (give agents sharing a log
    /// folder different names).
    pub name: String,
    /// Extra command-line arguments after `run` (e.g. `--auth iam`).
    pub args: Vec<String>,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
    /// Remove every inherited `AWS_*` variable first.
    pub clear_aws_env: bool,
    /// Extra `FLUIDITY_LOG` filter, e.g. `debug`.
    pub log: Option<String>,
    /// The `--server` value, instead of the server's address (a name, say).
    pub server_arg: Option<String>,
    /// The contents of an `/etc/hosts` the agent sees instead of this machine's (as
    /// [`ServerOptions::hosts`]).
    pub hosts: Option<String>,
}

impl Default for AgentOptions {
    fn default() -> Self {
        AgentOptions {
            name: "fluidity".to_owned(),
            args: Vec::new(),
            env: Vec::new(),
            clear_aws_env: false,
            log: None,
            server_arg: None,
            hosts: None,
        }
    }
}

impl Agent {
    /// Starts an agent against `server` and waits until its log says the tunnel is ready
    /// and its proxy port accepts connections.
    pub fn start(certs: &CertPaths, server: SocketAddr, log_dir: &Path) -> Agent {
        Agent::start_with(certs, server, &AgentOptions::default(), log_dir)
    }

    /// [`Agent::start`] with options.
    pub fn start_with(
        certs: &CertPaths,
        server: SocketAddr,
        opts: &AgentOptions,
        log_dir: &Path,
    ) -> Agent {
        for attempt in 1..=START_ATTEMPTS {
            let mut agent = Agent::spawn(certs, server, opts, log_dir);
            let ready = agent
                .proc
                .wait_log(START_LIMIT, |l| l.contains("tunnel ready"));
            if let Some(status) = agent.proc.exited() {
                let log = agent.proc.log();
                assert!(
                    attempt < START_ATTEMPTS && log.contains("bind"),
                    "{} exited ({status}) while starting:\n{log}",
                    opts.name
                );
                continue;
            }
            if !ready {
                agent.proc.print_log();
                panic!("the agent's tunnel was not ready within {START_LIMIT:?}");
            }
            let listen = agent.listen;
            wait_for("the proxy port", START_LIMIT, || {
                TcpStream::connect(listen).ok()
            });
            return agent;
        }
        unreachable!("the last attempt panics or returns")
    }

    /// Starts an agent without waiting for its tunnel (for tests of a tunnel that must
    /// not come up); the proxy port is picked free but may not be listening yet.
    pub fn spawn(
        certs: &CertPaths,
        server: SocketAddr,
        opts: &AgentOptions,
        log_dir: &Path,
    ) -> Agent {
        let listen = loopback(free_port());
        let mut cmd = command_with_files(
            &binaries().agent,
            opts.hosts.as_deref(),
            None,
            log_dir.join(format!("{}-", opts.name)),
        );
        cmd.arg("run")
            .arg("--listen")
            .arg(listen.to_string())
            .arg("--server")
            .arg(
                opts.server_arg
                    .clone()
                    .unwrap_or_else(|| server.to_string()),
            )
            .arg("--cert")
            .arg(&certs.client_cert)
            .arg("--key")
            .arg(&certs.client_key)
            .arg("--ca")
            .arg(&certs.ca_cert)
            .args(&opts.args);
        if opts.clear_aws_env {
            clear_aws_env(&mut cmd);
        }
        cmd.envs(opts.env.iter().map(|(k, v)| (k, v)));
        if let Some(f) = &opts.log {
            cmd.env("FLUIDITY_LOG", f);
        }
        let proc = Proc::spawn(&opts.name, cmd, log_dir);
        Agent { proc, listen }
    }

    /// `http://127.0.0.1:PORT`, for `curl -x`.
    pub fn proxy_url(&self) -> String {
        format!("http://{}", self.listen)
    }
}

/// A server and an agent joined by one tunnel, with their certificates and logs in a
/// temporary folder.
#[derive(Debug)]
pub struct Tunnel {
    /// The agent; dropped first so that it does not log a lost server at teardown.
    pub agent: Agent,
    /// The server.
    pub server: Server,
    /// The certificates.
    pub certs: CertPaths,
    /// The temporary folder (certificates, logs, scratch files); removed on drop.
    pub dir: TempDir,
}

impl Tunnel {
    /// A tunnel whose server may reach 127.0.0.1.
    pub fn start() -> Tunnel {
        Tunnel::with(ServerOptions::default())
    }

    /// A tunnel with a server started with `opts`.
    pub fn with(opts: ServerOptions) -> Tunnel {
        Tunnel::with_agent(opts, AgentOptions::default())
    }

    /// A tunnel with a server started with `server` and an agent started with `agent`.
    pub fn with_agent(server: ServerOptions, agent: AgentOptions) -> Tunnel {
        let dir = tempfile::Builder::new()
            .prefix("fluidity-e2e-")
            .tempdir()
            .expect("creating a temporary folder");
        let certs = certs_init(&dir.path().join("certs"));
        let server = Server::start(&certs, &server, dir.path());
        let agent = Agent::start_with(&certs, server.listen, &agent, dir.path());
        Tunnel {
            agent,
            server,
            certs,
            dir,
        }
    }

    /// The agent's proxy address.
    pub fn proxy(&self) -> SocketAddr {
        self.agent.listen
    }

    /// `http://127.0.0.1:PORT`, for `curl -x`.
    pub fn proxy_url(&self) -> String {
        self.agent.proxy_url()
    }

    /// A path in the temporary folder.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// A TCP relay on 127.0.0.1 standing for the network path between an agent and its
/// server. [`PathRelay::cut_silently`] makes the path die as a changed or failed network
/// does: the connections it carries get nothing more delivered either way, and nothing
/// is closed or reset; connections made afterwards go through.
#[derive(Debug)]
pub struct PathRelay {
    addr: SocketAddr,
    state: std::sync::Arc<RelayState>,
}

#[derive(Debug, Default)]
struct RelayState {
    /// Connections accepted so far.
    accepted: std::sync::atomic::AtomicUsize,
    /// Connections with an index below this are cut.
    cut_below: std::sync::atomic::AtomicUsize,
    /// Connections with an index below this carry nothing towards the server.
    cut_up_below: std::sync::atomic::AtomicUsize,
    /// Connections with an index from this on hold what they send towards the server
    /// (delivered late, not lost) while `holding` is set.
    hold_from: std::sync::atomic::AtomicUsize,
    holding: std::sync::atomic::AtomicBool,
    /// The relay is dropped: every thread ends.
    done: std::sync::atomic::AtomicBool,
}

impl PathRelay {
    /// Relays every connection to `to`.
    pub fn start(to: SocketAddr) -> PathRelay {
        use std::sync::atomic::Ordering::SeqCst;
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding the relay");
        listener.set_nonblocking(true).expect("nonblocking accept");
        let addr = listener.local_addr().expect("relay address");
        let state = std::sync::Arc::new(RelayState::default());
        let st = state.clone();
        std::thread::spawn(move || {
            while !st.done.load(SeqCst) {
                let Ok((down, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                let index = st.accepted.fetch_add(1, SeqCst);
                let Ok(up) = TcpStream::connect(to) else {
                    continue;
                };
                for (from, into, up) in [(&down, &up, true), (&up, &down, false)] {
                    let (Ok(mut from), Ok(mut into)) = (from.try_clone(), into.try_clone()) else {
                        continue;
                    };
                    let st = st.clone();
                    std::thread::spawn(move || relay_one_way(&mut from, &mut into, index, up, &st));
                }
            }
        });
        PathRelay { addr, state }
    }

    /// Where agents connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.state
            .accepted
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Stops carrying every connection accepted so far, without closing any.
    pub fn cut_silently(&self) {
        use std::sync::atomic::Ordering::SeqCst;
        self.state
            .cut_below
            .store(self.state.accepted.load(SeqCst), SeqCst);
    }

    /// Stops carrying what the connections accepted so far send towards the server; what
    /// the server sends still arrives (a path dead one way).
    pub fn cut_towards_server(&self) {
        use std::sync::atomic::Ordering::SeqCst;
        self.state
            .cut_up_below
            .store(self.state.accepted.load(SeqCst), SeqCst);
    }
}

impl PathRelay {
    /// Holds what connections accepted from now on send towards the server, until
    /// [`PathRelay::release`]: a handshake that takes its time. Nothing is lost.
    pub fn hold_new(&self) {
        use std::sync::atomic::Ordering::SeqCst;
        self.state
            .hold_from
            .store(self.state.accepted.load(SeqCst), SeqCst);
        self.state.holding.store(true, SeqCst);
    }

    /// Delivers what [`PathRelay::hold_new`] held, and all that follows.
    pub fn release(&self) {
        self.state
            .holding
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for PathRelay {
    fn drop(&mut self) {
        self.state
            .done
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Copies `from` into `into` (towards the server if `up`) until either ends, the
/// connection is cut that way (then it holds both sockets open and delivers nothing), or
/// the relay is dropped; while held, it reads nothing, so the bytes wait.
fn relay_one_way(
    from: &mut TcpStream,
    into: &mut TcpStream,
    index: usize,
    up: bool,
    st: &RelayState,
) {
    use std::sync::atomic::Ordering::SeqCst;
    let cut = || index < st.cut_below.load(SeqCst) || (up && index < st.cut_up_below.load(SeqCst));
    let held = || up && st.holding.load(SeqCst) && index >= st.hold_from.load(SeqCst);
    let _ = from.set_read_timeout(Some(Duration::from_millis(20)));
    let mut buf = vec![0; 64 * 1024];
    while !st.done.load(SeqCst) {
        if cut() || held() {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        match from.read(&mut buf) {
            Ok(0) => break,
            // Cut meanwhile: the bytes are lost, as on the dead path.
            Ok(_) if cut() => {}
            Ok(n) => {
                if into.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
    }
    let _ = into.shutdown(std::net::Shutdown::Write);
}
