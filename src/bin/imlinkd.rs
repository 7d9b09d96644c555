//! The daemon. Everything lives in the library; see `imlinkd::daemon`.
fn main() -> std::process::ExitCode {
    imlinkd::daemon::main()
}
