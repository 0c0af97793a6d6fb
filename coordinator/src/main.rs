//! `bulwark-coordinator`: see [`bulwark_coordinator::cli`].
fn main() -> std::process::ExitCode {
    bulwark_coordinator::cli::main_with(std::env::args_os())
}
