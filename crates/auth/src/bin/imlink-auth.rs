//! `imlink-auth`: see `imlink_auth::cli`.

fn main() -> std::process::ExitCode {
    imlink_auth::cli::main()
}
