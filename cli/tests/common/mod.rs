//! What the command's integration tests share.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

/// Runs the real `estuary` binary in `dir`, with no config taken from the environment.
pub fn estuary(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_estuary"))
        .current_dir(dir)
        .args(args)
        .env_remove("ESTUARY_CONFIG")
        .output()
        .expect("the estuary binary runs")
}
