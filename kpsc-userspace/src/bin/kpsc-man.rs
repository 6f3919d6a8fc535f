//! kpsc-man DIR: writes the man pages of kpscd and kpscctl into DIR (for the package).
use std::{path::PathBuf, process::ExitCode};

fn main() -> ExitCode {
    let Some(dir) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: kpsc-man DIR");
        return ExitCode::from(2);
    };
    match kpsc::man::write_pages(&dir) {
        Ok(pages) => {
            for page in pages {
                println!("{}", page.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("kpsc-man: {e:#}");
            ExitCode::FAILURE
        }
    }
}
