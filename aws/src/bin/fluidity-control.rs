//! `fluidity-control`: the control functions (Wake, Query, Kill, Sleep, CA) served over
//! HTTP on loopback in the shape of function URLs, so the whole on-demand lifecycle runs
//! on one machine (against moto, or a real account). Settings are the Lambda functions'
//! (`FLUIDITY_CLUSTER`, `FLUIDITY_SERVICE`, `FLUIDITY_TABLE`, `FLUIDITY_CA_SECRET`, …) and
//! the usual AWS variables; see docs/AWS.md.

use fluidity_runtime_smol::app::{self, LogFormat};
use fluidity_runtime_smol::listener::parse_listen_addr;
use std::net::{SocketAddr, TcpListener};
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use fluidity_aws::control::local::{serve, LocalOptions};
use fluidity_aws::control::{Control, ControlConfig};
use fluidity_aws::{AwsConfig, ChainOptions, Env};

/// Serves the Fluidity control functions on loopback: POST /wake, /query, /kill, /sleep
/// and /ca with JSON bodies; the caller's address is the TCP peer's.
#[derive(Parser, Debug)]
#[command(name = "fluidity-control", version)]
struct Args {
    /// Address to listen on; loopback only (port 0 picks a free port).
    #[arg(
        long,
        env = "FLUIDITY_CONTROL_LISTEN",
        default_value = "127.0.0.1:9000",
        value_parser = parse_listen_addr
    )]
    listen: SocketAddr,
    /// Refuse requests that carry no SigV4 signature for service lambda, as function URLs
    /// under AWS_IAM do (the signature itself cannot be checked without AWS).
    #[arg(long)]
    require_signature: bool,
}

fn main() -> ExitCode {
    app::init_logging(LogFormat::Text, "info");
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("fluidity-control: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<(), String> {
    if !args.listen.ip().is_loopback() {
        return Err(format!(
            "{} is not a loopback address; the local control host is for one machine",
            args.listen
        ));
    }
    let env = Env::process();
    let config = ControlConfig::from_env(&env).map_err(|e| e.message)?;
    let aws = AwsConfig::from_env(&env, &ChainOptions::default()).map_err(|e| e.to_string())?;
    let listener = TcpListener::bind(args.listen)
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    // The one line on stdout: tests and scripts read the address from it.
    println!("fluidity-control listening on http://{addr}");
    let options = LocalOptions {
        require_signature: args.require_signature,
    };
    serve(listener, Arc::new(Control::new(config, aws)), options)
        .map_err(|e| format!("accept failed: {e}"))
}
