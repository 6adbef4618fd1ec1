//! The Lambda entry point of the control functions, for the `provided.al2023` runtime
//! (which runs a file named `bootstrap`). One binary serves every function; the function
//! is chosen by `FLUIDITY_FUNCTION` (`wake`, `query`, `kill`, `sleep` or `ca`) in the
//! function's environment. See `fluidity_aws::control::lambda` for why this is a small
//! runtime on `ureq` rather than the tokio-based `lambda_runtime` crate.

use std::process::ExitCode;

use fluidity_aws::control::lambda::RuntimeApi;
use fluidity_aws::control::{Control, ControlConfig, Function};
use fluidity_aws::{AwsConfig, ChainOptions, Env};
use fluidity_runtime_smol::app::{self, LogFormat};

fn main() -> ExitCode {
    // Lambda sends stderr to CloudWatch Logs: one JSON object a line, no colours.
    app::init_logging(LogFormat::Json, "info");
    let env = Env::process();
    let Some(api) = env.get("AWS_LAMBDA_RUNTIME_API") else {
        eprintln!(
            "bootstrap: AWS_LAMBDA_RUNTIME_API is not set; this binary runs inside AWS Lambda"
        );
        return ExitCode::FAILURE;
    };
    let runtime = RuntimeApi::new(api);
    let control = match setup(&env) {
        Ok(setup) => setup,
        Err(message) => {
            tracing::error!(%message, "cannot start");
            if let Err(e) = runtime.init_error(&message) {
                tracing::error!(error = %e, "cannot report the init error");
            }
            return ExitCode::FAILURE;
        }
    };
    let (control, function) = control;
    tracing::info!(%function, "serving");
    match runtime.run(&control, function) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "the Runtime API failed");
            ExitCode::FAILURE
        }
    }
}

fn setup(env: &Env) -> Result<(Control, Function), String> {
    let function: Function = env
        .get("FLUIDITY_FUNCTION")
        .ok_or("FLUIDITY_FUNCTION is not set (wake, query, kill, sleep or ca)")?
        .parse()?;
    let config = ControlConfig::from_env(env).map_err(|e| e.message)?;
    let aws = AwsConfig::from_env(env, &ChainOptions::default()).map_err(|e| e.to_string())?;
    Ok((Control::new(config, aws), function))
}
