//! The skeleton of a daemon's `run` and `check-config` commands, shared so that every
//! daemon treats bad configuration, logging and failures alike.

use std::future::Future;
use std::process::ExitCode;

use serde::Serialize;

use crate::settings::{ConfigError, EX_USAGE};

/// `<program> run`: refuses invalid settings with exit code 64 naming the key, then
/// bounds the malloc arenas ([`crate::bound_malloc_arenas`], which may restart the
/// process once), starts logging (JSON when the flag or the settings ask for it), a multi-threaded
/// runtime, and the daemon's `body` until it returns; its error is printed with its
/// causes and the exit status is 1.
pub fn run_daemon<S, F>(
    program: &str,
    settings: Result<S, ConfigError>,
    log_json_flag: bool,
    log_json_setting: impl FnOnce(&S) -> bool,
    body: impl FnOnce(S) -> F,
) -> ExitCode
where
    F: Future<Output = anyhow::Result<()>>,
{
    let settings = match settings {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{program}: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    crate::process::bound_malloc_arenas(program);
    crate::process::init_logging(log_json_flag || log_json_setting(&settings), "info");
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{program}: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    report(program, runtime.block_on(body(settings)))
}

/// A command's outcome as an exit status: 0, or 1 after printing the error and its
/// causes.
pub fn report(program: &str, result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{program}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `<program> check-config`: prints the effective settings as TOML (exit 0), or the
/// error naming the key (exit 64).
pub fn report_check<T: Serialize>(program: &str, settings: Result<T, ConfigError>) -> ExitCode {
    match settings.map(|s| toml::to_string(&s)) {
        Ok(Ok(text)) => {
            println!("# {program}: configuration is valid; effective settings:\n{text}");
            ExitCode::SUCCESS
        }
        Ok(Err(e)) => {
            eprintln!("{program}: cannot print the settings: {e}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("{program}: {e}");
            ExitCode::from(EX_USAGE)
        }
    }
}
