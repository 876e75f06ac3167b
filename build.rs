//! Rebuilds the library when a migration is added: `embed_migrations!`
//! reads the folder at compile time, and cargo does not watch a folder a
//! macro reads unless told.

fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
