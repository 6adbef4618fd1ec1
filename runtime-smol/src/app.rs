//! What both binaries need around the runtime: an executor on a few threads, shutdown
//! signals, and logging.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::Level;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::driver::lock;

/// Runs `main` on a multi-threaded smol executor (`threads` workers, at least one) until it
/// completes; tasks it spawns on the executor it is given run on all workers.
pub fn run<T, F, Fut>(threads: usize, main: F) -> T
where
    F: FnOnce(Arc<smol::Executor<'static>>) -> Fut,
    Fut: Future<Output = T>,
{
    raise_descriptor_limit();
    let ex = Arc::new(smol::Executor::new());
    let (stop, stopped) = async_channel::bounded::<()>(1);
    std::thread::scope(|scope| {
        for i in 1..threads.max(1) {
            let ex = ex.clone();
            let stopped = stopped.clone();
            let _ = std::thread::Builder::new()
                .name(format!("fluidity-worker-{i}"))
                .spawn_scoped(scope, move || smol::block_on(ex.run(stopped.recv())));
        }
        let out = smol::block_on(ex.run(OnlyWhenWoken::new(main(ex.clone()))));
        drop(stop);
        out
    })
}

/// Raises the soft limit on open files to the hard one, as many servers (and Go's
/// runtime) do at start: every proxied connection holds a descriptor (two in the server,
/// and both sides in local mode's one process), and the soft limit is often 1024, or 256
/// on macOS, far below what the system allows the process. Where the hard limit is
/// unlimited, which macOS refuses as a soft limit, 10240 (its `OPEN_MAX`) is tried.
pub fn raise_descriptor_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    let Some(soft) = limit.current else {
        return; // Unlimited already.
    };
    for target in [limit.maximum, Some(10240)] {
        let Some(target) = target.filter(|&t| t > soft) else {
            continue;
        };
        let raised = Rlimit {
            current: Some(target),
            maximum: limit.maximum,
        };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => {
                tracing::debug!(from = soft, to = target, "raised the open files limit");
                return;
            }
            Err(e) => {
                tracing::debug!(from = soft, to = target, error = %e, "cannot raise the open files limit")
            }
        }
    }
}

/// Polls the inner future only after it asked to be woken.
///
/// `block_on(ex.run(main))` polls `main` every time its thread wakes, and the thread wakes
/// for every task scheduled on the executor. An accept loop inside `main` then retries
/// `accept` (a failing system call) once or twice per wake-up: thousands of times a
/// second under load. Skipping the polls nobody asked for removes them.
struct OnlyWhenWoken<F> {
    inner: std::pin::Pin<Box<F>>,
    flag: Arc<WokenFlag>,
}

/// Whether the inner future has been woken since its last poll, and whom to tell.
struct WokenFlag {
    woken: std::sync::atomic::AtomicBool,
    outer: std::sync::Mutex<Option<std::task::Waker>>,
}

impl std::task::Wake for WokenFlag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, std::sync::atomic::Ordering::Release);
        let outer = lock(&self.outer).clone();
        if let Some(w) = outer {
            w.wake();
        }
    }
}

impl<F: Future> OnlyWhenWoken<F> {
    fn new(inner: F) -> Self {
        OnlyWhenWoken {
            inner: Box::pin(inner),
            flag: Arc::new(WokenFlag {
                // The first poll always happens.
                woken: std::sync::atomic::AtomicBool::new(true),
                outer: std::sync::Mutex::new(None),
            }),
        }
    }
}

impl<F: Future> Future for OnlyWhenWoken<F> {
    type Output = F::Output;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<F::Output> {
        {
            let mut outer = lock(&self.flag.outer);
            if !outer.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *outer = Some(cx.waker().clone());
            }
        }
        // The outer waker is stored before the flag is read, so a wake in between is seen.
        if !self
            .flag
            .woken
            .swap(false, std::sync::atomic::Ordering::AcqRel)
        {
            return std::task::Poll::Pending;
        }
        let waker = std::task::Waker::from(self.flag.clone());
        self.inner
            .as_mut()
            .poll(&mut std::task::Context::from_waker(&waker))
    }
}

/// One worker thread per CPU.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// Most executor threads a `threads` setting may ask for; more would only exhaust memory
/// creating them.
pub const MAX_THREADS: usize = 256;

/// Refuses a `threads` setting over [`MAX_THREADS`], with what to give instead.
pub fn check_threads(setting: usize) -> Result<(), String> {
    if setting > MAX_THREADS {
        return Err(format!(
            "threads = {setting} is more than {MAX_THREADS}; give a smaller number, or 0 for \
             one per CPU"
        ));
    }
    Ok(())
}

/// Worker threads for a `threads` setting: the setting itself, or one per CPU for 0.
pub fn threads(setting: usize) -> usize {
    if setting == 0 {
        default_threads()
    } else {
        setting
    }
}

/// The instant `limit` from now. Limits come from configuration files and flags; one beyond
/// what the clock can count gives a deadline a century away rather than a panic.
pub fn deadline_in(limit: Duration) -> Instant {
    fluidity_proto::deadline(Instant::now(), limit)
}

/// Waits until `done()` holds or `limit` has passed, and returns whether it holds. It is
/// checked every 20 ms: for state that changes without an event to wait on (tunnels and
/// connections ending during a shutdown).
pub async fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = deadline_in(limit);
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        async_io::Timer::after(Duration::from_millis(20)).await;
    }
}

/// Completes when the process receives SIGINT or SIGTERM (Ctrl-C or a service stop). A
/// second one while the process drains ends it at once, with the exit status of a
/// process killed by that signal (130 for SIGINT, 143 for SIGTERM): a person pressing
/// Ctrl-C again does not want to wait for the drain.
pub async fn shutdown_signal() {
    wait_for_shutdown(Later::Exit).await;
}

/// [`shutdown_signal`] for a process whose shutdown has work to finish (the AWS-mode
/// agent stops its server after the drain): each later signal calls `later` with its
/// count (2 for the second), which decides what it means; the process goes on unless
/// `later` ends it.
pub async fn shutdown_signal_then(later: impl Fn(u32) + Send + 'static) {
    wait_for_shutdown(Later::Call(Box::new(later))).await;
}

/// What signals after the first do.
enum Later {
    /// End the process at once, as killed by the signal.
    Exit,
    /// Call this with the signal's count.
    Call(Box<dyn Fn(u32) + Send>),
}

/// Runs the forced-exit hooks and exits as killed by `sig` (128 + its number).
fn exit_as_killed_by(sig: async_signal::Signal) -> ! {
    let number = match sig {
        async_signal::Signal::Int => 2,
        _ => 15,
    };
    for hook in FORCED_EXIT_HOOKS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
    {
        hook();
    }
    std::process::exit(128 + number);
}

/// Runs the forced-exit hooks and exits with 130, as a process stopped by Ctrl-C: for a
/// [`shutdown_signal_then`] callback that decides to end the process.
pub fn exit_now() -> ! {
    exit_as_killed_by(async_signal::Signal::Int)
}

/// What runs before a second signal ends the process at once.
type ForcedExitHook = Box<dyn Fn() + Send + Sync>;

static FORCED_EXIT_HOOKS: Mutex<Vec<ForcedExitHook>> = Mutex::new(Vec::new());

/// Runs `hook` if a second signal ends the process at once ([`shutdown_signal`]), before
/// it exits: to reset the connections the exit cuts, which would otherwise end with a
/// clean close that a peer could take for a complete transfer.
pub fn on_forced_exit(hook: impl Fn() + Send + Sync + 'static) {
    FORCED_EXIT_HOOKS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(Box::new(hook));
}

async fn wait_for_shutdown(later: Later) {
    use async_signal::{Signal, Signals};
    use futures_lite::StreamExt;
    match Signals::new([Signal::Term, Signal::Int]) {
        Ok(mut signals) => {
            if let Some(Ok(sig)) = signals.next().await {
                match later {
                    Later::Exit => tracing::info!(signal = ?sig,
                        "shutdown requested; a second signal stops at once"),
                    Later::Call(_) => tracing::info!(signal = ?sig, "shutdown requested"),
                }
            }
            // The signals stay caught: dropped, they would be neither handled nor back
            // to their default, and a person pressing Ctrl-C again would get nothing.
            let spawned = std::thread::Builder::new()
                .name("later-signals".into())
                .spawn(move || {
                    let mut count = 1;
                    while let Some(Ok(sig)) = async_io::block_on(signals.next()) {
                        count += 1;
                        match &later {
                            Later::Exit => {
                                tracing::warn!(signal = ?sig, "second signal: stopping now, open streams cut");
                                exit_as_killed_by(sig);
                            }
                            Later::Call(f) => f(count),
                        }
                    }
                });
            if let Err(e) = spawned {
                tracing::debug!(error = %e, "no thread for a second signal");
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for signals; stop the process to exit");
            futures_lite::future::pending::<()>().await;
        }
    }
}

/// Parses the command line as clap does, and when a value is refused says so if it came
/// from an environment variable: clap names only the flag, and a user who set the variable
/// would look for the mistake on a command line that does not hold it.
#[cfg(feature = "clap")]
pub fn parse_cli<C: clap::Parser>() -> C {
    C::try_parse().unwrap_or_else(|e| {
        let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
        let Some(note) = env_note(&C::command(), &e, &args, |v| std::env::var_os(v)) else {
            e.exit()
        };
        // Printing can fail only when stderr is gone, and then nothing can be said.
        let _ = e.print();
        eprintln!("{note}");
        std::process::exit(e.exit_code())
    })
}

/// The note [`parse_cli`] adds to `error`: which environment variable (read with
/// `var`) holds the refused value, unless the command line `args` gives the flag that
/// value itself.
#[cfg(feature = "clap")]
fn env_note(
    cmd: &clap::Command,
    error: &clap::Error,
    args: &[std::ffi::OsString],
    var: impl Fn(&std::ffi::OsStr) -> Option<std::ffi::OsString>,
) -> Option<String> {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if !matches!(
        error.kind(),
        ErrorKind::InvalidValue | ErrorKind::ValueValidation
    ) {
        return None;
    }
    let (Some(ContextValue::String(arg)), Some(ContextValue::String(value))) = (
        error.get(ContextKind::InvalidArg),
        error.get(ContextKind::InvalidValue),
    ) else {
        return None;
    };
    // clap writes the argument as `--long <VALUE>`.
    let long = arg.split_whitespace().next()?.strip_prefix("--")?;
    let found = find_arg(cmd, long)?;
    let env = found.get_env()?;
    let forms: Vec<String> = [
        Some(format!("--{long}")),
        found.get_short().map(|c| format!("-{c}")),
    ]
    .into_iter()
    .flatten()
    .collect();
    // `--long VALUE`, `--long=VALUE`, `-s VALUE`, `-sVALUE`, `-s=VALUE`.
    let given = args
        .windows(2)
        .any(|w| forms.iter().any(|f| w[0] == f.as_str()) && w[1].to_str() == Some(value.as_str()))
        || args.iter().filter_map(|a| a.to_str()).any(|a| {
            forms.iter().any(|f| {
                a.strip_prefix(f.as_str())
                    .map(|rest| rest.strip_prefix('=').unwrap_or(rest))
                    .is_some_and(|rest| !rest.is_empty() && rest == value)
            })
        });
    if given {
        return None;
    }
    (var(env)?.to_str() == Some(value.as_str())).then(|| {
        format!(
            "note: the value comes from the environment variable {}; correct or unset it",
            env.to_string_lossy()
        )
    })
}

/// The argument `--long` of `cmd` or of its subcommands.
#[cfg(feature = "clap")]
fn find_arg<'a>(cmd: &'a clap::Command, long: &str) -> Option<&'a clap::Arg> {
    cmd.get_arguments()
        .find(|a| a.get_long() == Some(long))
        .or_else(|| cmd.get_subcommands().find_map(|s| find_arg(s, long)))
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Lets a message that can repeat many times a second (a flood of refused connections)
/// through at most once per period, counting the ones it held back.
#[derive(Debug)]
pub struct LogThrottle {
    every: Duration,
    state: std::sync::Mutex<(Option<Instant>, u64)>,
}

impl LogThrottle {
    /// A throttle letting one message through per `every`.
    pub const fn new(every: Duration) -> Self {
        LogThrottle {
            every,
            state: std::sync::Mutex::new((None, 0)),
        }
    }

    /// Whether a message may be logged at `now`: `Some(held_back)` with how many were
    /// held back since the last one, or `None` (this one is counted as held back).
    pub fn allow(&self, now: Instant) -> Option<u64> {
        let mut s = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (last, held) = &mut *s;
        if last.is_some_and(|t| now < t + self.every) {
            *held += 1;
            return None;
        }
        *last = Some(now);
        Some(std::mem::take(held))
    }
}

/// Installs the global tracing subscriber on stderr. What is logged comes from
/// `FLUIDITY_LOG`, else `default_filter` (see [`log_filter`]); a `FLUIDITY_LOG` that is not
/// a filter is reported, and the default used.
pub fn init_logging(format: LogFormat, default_filter: &str) {
    let (filter, invalid) = log_filter(
        std::env::var("FLUIDITY_LOG").ok().as_deref(),
        default_filter,
    );
    // Colours only for a person at a terminal, not in a file or a pipe; NO_COLOR as usual.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(colour);
    let registry = tracing_subscriber::registry().with(filter);
    let _ = match format {
        LogFormat::Text => registry.with(layer).try_init(),
        LogFormat::Json => registry.with(layer.json()).try_init(),
    };
    if let Some(why) = invalid {
        tracing::warn!(
            error = %why,
            "FLUIDITY_LOG is not a valid filter: give a level (info), targets with levels \
             (fluidity_agent=debug), or both, comma-separated; using {default_filter:?}"
        );
    }
}

/// Reports the error that ends the program: `PROGRAM: ERROR` on stderr, or with
/// `--log-format json` a log line at level ERROR, so that the last line a log collector
/// reads parses like the others.
pub fn report_exit(program: &str, format: LogFormat, error: &dyn std::fmt::Display) {
    match format {
        LogFormat::Text => eprintln!("{program}: {error}"),
        LogFormat::Json if tracing::enabled!(tracing::Level::ERROR) => {
            tracing::error!(program, error = %error, "stopped by an error")
        }
        // A filter that silences errors (FLUIDITY_LOG=off) must not hide why the program
        // stopped: the line is written as the JSON layer would have.
        LogFormat::Json => {
            let line = serde_json::json!({
                "level": "ERROR",
                "fields": {
                    "message": "stopped by an error",
                    "program": program,
                    "error": error.to_string(),
                },
                "target": module_path!(),
            });
            eprintln!("{line}");
        }
    }
}

/// The log filter for `var` (the value of `FLUIDITY_LOG`, if set and not blank), else for
/// `default` (else `info`): a level, targets with levels, or both, comma-separated
/// (`warn,fluidity_agent=debug`; spaces around the parts are ignored). Targets not named
/// log at the level given alone, else at `default`'s: naming one target never silences
/// the rest. A part without `=` must be a level, so that a mistyped level (`degub`) is
/// reported rather than read as a target. Returns why `var` was not valid, if it was not.
/// `ureq_proto` and the targets under it log at debug at most.
pub fn log_filter(var: Option<&str>, default: &str) -> (Targets, Option<String>) {
    // Targets takes neither spaces nor empty parts, which a person typing a filter writes.
    let tidy = |f: &str| {
        f.split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .collect::<Vec<_>>()
            .join(",")
    };
    let fallback = || {
        tidy(default)
            .parse::<Targets>()
            .unwrap_or_else(|_| Targets::new().with_default(LevelFilter::INFO))
    };
    let not_a_level = |v: &str| {
        v.split(',')
            .find(|p| !p.contains('=') && p.parse::<LevelFilter>().is_err())
            .map(|p| {
                format!(
                    "{p:?} is not a level (trace, debug, info, warn, error, off); a target \
                     takes one after '=', as in fluidity_agent=debug"
                )
            })
    };
    let (mut filter, invalid) = match var.map(tidy).filter(|v| !v.is_empty()) {
        Some(v) => match not_a_level(&v) {
            Some(why) => (fallback(), Some(why)),
            None => match v.parse::<Targets>() {
                Ok(t) => (t, None),
                Err(e) => (fallback(), Some(e.to_string())),
            },
        },
        None => (fallback(), None),
    };
    if filter.default_level().is_none() {
        let level = fallback().default_level().unwrap_or(LevelFilter::INFO);
        filter = filter.with_default(level);
    }
    // `ureq-proto` (the HTTP client under the AWS calls) dumps whole requests, the
    // Authorization header and session tokens included, as hex at trace level. Whatever
    // `FLUIDITY_LOG` asks for, that target and each under it stay at what was asked, but
    // at debug at most, where `ureq` redacts them. `ureq_proto` itself always gets a
    // directive, so that none for a shorter prefix (`ureq=trace`) or the default reaches
    // the targets under it.
    const UREQ_PROTO: &str = "ureq_proto";
    const LEVELS: [Level; 5] = [
        Level::TRACE,
        Level::DEBUG,
        Level::INFO,
        Level::WARN,
        Level::ERROR,
    ];
    let for_target = LEVELS
        .into_iter()
        .find(|l| filter.would_enable(UREQ_PROTO, l))
        .map_or(LevelFilter::OFF, LevelFilter::from_level);
    let mut capped = Targets::new()
        .with_targets(filter.iter().map(|(t, level)| {
            let level = if t.starts_with(UREQ_PROTO) {
                level.min(LevelFilter::DEBUG)
            } else {
                level
            };
            (t, level)
        }))
        .with_target(UREQ_PROTO, for_target.min(LevelFilter::DEBUG));
    if let Some(level) = filter.default_level() {
        capped = capped.with_default(level);
    }
    (capped, invalid)
}

/// The largest configuration file read: far above any real one, and a bound on what a
/// wrong path (`/dev/zero`) costs.
pub const MAX_CONFIG_LEN: u64 = 1024 * 1024;

/// A configuration file's text, of at most [`MAX_CONFIG_LEN`] bytes.
fn read_config(path: &Path) -> Result<String, String> {
    let bytes = crate::files::read_limited(path, MAX_CONFIG_LEN)
        .map_err(|e| format!("cannot read config file {}: {e}", path.display()))?
        .ok_or_else(|| {
            format!(
                "config file {} is larger than {MAX_CONFIG_LEN} bytes; is it the right file?",
                path.display()
            )
        })?;
    String::from_utf8(bytes)
        .map_err(|_| format!("config file {} is not UTF-8 text", path.display()))
}

/// Reads a TOML configuration file and makes the relative paths `paths(&mut cfg)` yields
/// relative to the file's folder, as a user expects of paths written in a config file.
/// The error says which file and what is wrong.
pub fn load_toml<T, F>(path: &Path, paths: F) -> Result<T, String>
where
    T: serde::de::DeserializeOwned,
    F: FnOnce(&mut T) -> Vec<&mut PathBuf>,
{
    let text = read_config(path)?;
    let mut cfg: T =
        toml::from_str(&text).map_err(|e| format!("config file {}: {e}", path.display()))?;
    if let Some(dir) = path.parent() {
        for p in paths(&mut cfg) {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        }
    }
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_file_past_the_size_limit_is_refused_unread() {
        let err = load_toml::<toml::Table, _>(Path::new("/dev/zero"), |_| Vec::new())
            .expect_err("/dev/zero is no config file");
        assert!(err.contains("is larger than"), "{err}");
    }

    #[cfg(feature = "clap")]
    #[test]
    fn a_refused_value_from_the_environment_names_its_variable() {
        use clap::{CommandFactory, Parser};
        use std::ffi::{OsStr, OsString};
        #[derive(Parser, Debug)]
        struct Cli {
            #[arg(long, short, env = "TEST_THREADS")]
            threads: Option<usize>,
        }
        let env = |v: &OsStr| (v == "TEST_THREADS").then(|| OsString::from("abc"));
        let args = |a: &[&str]| a.iter().map(OsString::from).collect::<Vec<_>>();
        let error = |a: &[&str]| Cli::try_parse_from(args(a)).expect_err("abc is not a number");
        // The error clap gives for the value, wherever it came from.
        let e = error(&["prog", "--threads", "abc"]);
        let note = env_note(&Cli::command(), &e, &args(&["prog"]), env);
        assert_eq!(
            note.as_deref(),
            Some("note: the value comes from the environment variable TEST_THREADS; correct or unset it")
        );
        // A bad value on the command line is the command line's.
        for given in [
            &["prog", "--threads", "abc"][..],
            &["prog", "--threads=abc"],
            &["prog", "-t", "abc"],
            &["prog", "-tabc"],
        ] {
            assert_eq!(env_note(&Cli::command(), &e, &args(given), env), None);
        }
        // A good value on the command line does not hide the variable's bad one, which
        // clap may read all the same (for the same flag of another subcommand).
        for given in [&["prog", "run", "--threads", "4"][..], &["prog", "-t4"]] {
            assert!(env_note(&Cli::command(), &e, &args(given), env).is_some());
        }
        // A variable holding another value is not the one refused.
        let other = |v: &OsStr| (v == "TEST_THREADS").then(|| OsString::from("4"));
        assert_eq!(env_note(&Cli::command(), &e, &args(&["prog"]), other), None);
    }

    /// Each test runs in a process of its own (nextest), so lowering this process's limit
    /// touches no other test.
    #[test]
    fn the_open_files_limit_is_raised_to_the_hard_one() {
        use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
        let before = getrlimit(Resource::Nofile);
        let Some(hard) = before.maximum.filter(|&h| h > 256) else {
            return; // Nothing to raise to on this machine.
        };
        setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(256),
                maximum: Some(hard),
            },
        )
        .expect("lowering the soft limit");
        raise_descriptor_limit();
        assert_eq!(getrlimit(Resource::Nofile).current, Some(hard));
    }

    #[test]
    fn the_log_filter_takes_levels_and_targets_and_caps_ureq_proto() {
        let (f, bad) = log_filter(None, "info");
        assert!(bad.is_none());
        assert!(f.would_enable("fluidity_agent::proxy", &Level::INFO));
        assert!(!f.would_enable("fluidity_agent::proxy", &Level::DEBUG));

        let (f, bad) = log_filter(Some("warn,fluidity_agent=debug"), "info");
        assert!(bad.is_none());
        assert!(f.would_enable("fluidity_agent::proxy::http", &Level::DEBUG));
        assert!(!f.would_enable("fluidity_runtime_smol::driver", &Level::INFO));
        assert!(f.would_enable("fluidity_runtime_smol::driver", &Level::WARN));

        // The session tokens ureq_proto dumps at trace never show, whatever is asked.
        let (f, _) = log_filter(Some("trace"), "info");
        assert!(f.would_enable("fluidity_aws", &Level::TRACE));
        assert!(f.would_enable("ureq_proto::client", &Level::DEBUG));
        assert!(!f.would_enable("ureq_proto::client", &Level::TRACE));
        for asked in [
            "ureq_proto=trace",
            "ureq_proto::client=trace,info",
            "ureq=trace,info",
        ] {
            let (f, _) = log_filter(Some(asked), "info");
            assert!(
                !f.would_enable("ureq_proto::client", &Level::TRACE),
                "{asked}"
            );
            assert!(
                f.would_enable("ureq_proto::client", &Level::DEBUG),
                "{asked}"
            );
        }
        // Each target under it keeps what was asked for it, below the cap.
        let (f, _) = log_filter(
            Some("info,ureq_proto::client=off,ureq_proto::util=debug"),
            "info",
        );
        assert!(!f.would_enable("ureq_proto::client", &Level::ERROR));
        assert!(f.would_enable("ureq_proto::util", &Level::DEBUG));
        assert!(f.would_enable("ureq_proto::body", &Level::INFO));
        assert!(!f.would_enable("ureq_proto::body", &Level::DEBUG));
        // A cap, not a floor: at info, its debug lines stay off.
        let (f, _) = log_filter(None, "info");
        assert!(f.would_enable("ureq_proto", &Level::INFO));
        assert!(!f.would_enable("ureq_proto", &Level::DEBUG));

        // Spaces and empty parts, as people type them, are no mistake; a blank value is
        // the default.
        let (f, bad) = log_filter(Some(" warn , fluidity_agent=debug,"), "info");
        assert!(bad.is_none());
        assert!(f.would_enable("fluidity_agent::proxy", &Level::DEBUG));
        assert!(!f.would_enable("fluidity_server", &Level::INFO));
        let (f, bad) = log_filter(Some(" "), "info");
        assert!(bad.is_none());
        assert!(f.would_enable("fluidity_server", &Level::INFO));

        // An invalid value is reported, and the default used.
        let (f, bad) = log_filter(Some("fluidity_agent=loud"), "info");
        assert!(bad.is_some());
        assert!(f.would_enable("fluidity_agent", &Level::INFO));
        assert!(!f.would_enable("fluidity_agent", &Level::DEBUG));
    }

    #[test]
    fn a_throttled_message_passes_once_per_period_and_counts_the_rest() {
        let t = LogThrottle::new(Duration::from_secs(10));
        let start = Instant::now();
        assert_eq!(t.allow(start), Some(0));
        assert_eq!(t.allow(start + Duration::from_secs(1)), None);
        assert_eq!(t.allow(start + Duration::from_secs(9)), None);
        assert_eq!(t.allow(start + Duration::from_secs(10)), Some(2));
        assert_eq!(t.allow(start + Duration::from_secs(11)), None);
        assert_eq!(t.allow(start + Duration::from_secs(30)), Some(1));
    }

    #[test]
    fn a_mistyped_level_is_reported_and_naming_a_target_silences_nothing_else() {
        for typo in ["degub", "warn,degub", "fluidity_agent"] {
            let (f, bad) = log_filter(Some(typo), "info");
            let bad = bad.expect("reported");
            assert!(bad.contains("is not a level"), "{typo}: {bad}");
            assert!(f.would_enable("fluidity_agent", &Level::WARN), "{typo}");
            assert!(f.would_enable("fluidity_server", &Level::INFO), "{typo}");
        }
        // A target alone: the rest keep the default level, warnings included.
        let (f, bad) = log_filter(Some("fluidity_agent=debug"), "info");
        assert!(bad.is_none());
        assert!(f.would_enable("fluidity_agent::proxy", &Level::DEBUG));
        assert!(f.would_enable("fluidity_runtime_smol::driver", &Level::INFO));
        assert!(!f.would_enable("fluidity_runtime_smol::driver", &Level::DEBUG));
        let (f, _) = log_filter(Some("fluidity_agent=debug"), "warn");
        assert!(f.would_enable("fluidity_runtime_smol::driver", &Level::WARN));
        assert!(!f.would_enable("fluidity_runtime_smol::driver", &Level::INFO));
        // An empty level after '=' is no way to silence everything either.
        let (f, _) = log_filter(Some("trace="), "info");
        assert!(f.would_enable("fluidity_agent", &Level::WARN));
    }

    #[test]
    fn a_deadline_beyond_the_clock_is_far_away_not_a_panic() {
        let before = Instant::now();
        let d = deadline_in(Duration::from_secs(5));
        assert!(d >= before + Duration::from_secs(5));
        let far = deadline_in(Duration::MAX);
        assert!(far > before + Duration::from_secs(50 * 365 * 86_400));
        let far = deadline_in(Duration::from_secs(u64::MAX));
        assert!(far > before);
    }
}
