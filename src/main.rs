fn main() {
    if let Err(e) = dds::cli::main() {
        // The whole chain, each cause once: some errors already name their source.
        let mut message = e.to_string();
        for cause in e.chain().skip(1) {
            let cause = cause.to_string();
            if !message.contains(&cause) {
                message.push_str(": ");
                message.push_str(&cause);
            }
        }
        eprintln!("dds: {message}");
        std::process::exit(e.downcast_ref::<dds::cli::ExitCode>().map_or(2, |c| c.0));
    }
}
