//! Extracts .deb files into a directory and prints how long it took:
//! `cargo run --release -p caisson-debian --example extract -- DEST DEB...`

use std::path::PathBuf;
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args_os().skip(1).map(PathBuf::from);
    let dest = args.next().ok_or("usage: extract DEST DEB...")?;
    let debs: Vec<PathBuf> = args.collect();
    let start = Instant::now();
    caisson_debian::merged_usr_skeleton(&dest)?;
    let mut entries = 0;
    for deb in &debs {
        entries += caisson_debian::extract(deb, &dest)?.len();
    }
    let secs = start.elapsed().as_secs_f64();
    println!("{} packages, {entries} entries, {secs:.2} s", debs.len());
    Ok(())
}
