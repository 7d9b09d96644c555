//! The command-line client. Everything lives in the library; see `imlinkd::ctl`.
fn main() -> std::process::ExitCode {
    imlinkd::ctl::main()
}
