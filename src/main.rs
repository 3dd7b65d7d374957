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
        // A brick's or an authority's stderr is its log: its last line is in the log's
        // format, at level ERROR.
        match std::env::args().nth(1).as_deref() {
            Some(role @ ("brick" | "meta")) => {
                let message = message.strip_prefix(&format!("{role}: ")).unwrap_or(&message);
                eprintln!("{} ERROR {role}: {message}", dds::logging::timestamp())
            }
            _ => eprintln!("dds: {message}"),
        }
        std::process::exit(e.downcast_ref::<dds::cli::ExitCode>().map_or(2, |c| c.0));
    }
}
