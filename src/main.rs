#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    shoal::cli::main()
}
