//! `bulwark-agent`: see [`bulwark_agent::cli`].
fn main() -> std::process::ExitCode {
    bulwark_agent::cli::main_with(std::env::args_os())
}
