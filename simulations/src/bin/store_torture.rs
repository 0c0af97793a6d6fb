//! `bulwark-store-torture DIR SEED [--gc]`: the store crash workload (see
//! `bulwark_simulations::torture`). Runs until killed.
fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let (Some(dir), Some(seed)) = (args.get(1), args.get(2).and_then(|s| s.parse().ok())) else {
        eprintln!("usage: bulwark-store-torture DIR SEED [--gc]");
        return std::process::ExitCode::from(2);
    };
    match bulwark_simulations::torture::run(std::path::Path::new(dir), seed, args.iter().any(|a| a == "--gc")) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
