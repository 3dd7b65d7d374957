fn main() {
    if let Err(e) = dds::cli::main() {
        eprintln!("dds: {e:#}");
        std::process::exit(e.downcast_ref::<dds::cli::ExitCode>().map_or(2, |c| c.0));
    }
}
