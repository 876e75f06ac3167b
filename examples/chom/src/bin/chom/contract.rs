//! `chom schema export | check` and `chom asyncapi`: CHOM's event
//! contracts, from the registry `chom work` runs (see `outbox::contract`).

use std::path::{Path, PathBuf};

use outbox::contract::SchemaSet;
use outbox::contract::asyncapi::{AsyncApiOptions, document};
use outbox::contract::compat;

use super::*;

/// Subcommands of `chom schema`.
#[derive(Debug, Subcommand)]
pub(crate) enum SchemaCommand {
    /// Write the JSON Schema of every event type and version into DIR, one
    /// file each (`site.created.v1.schema.json`), with stable names and
    /// bytes; other files in DIR are left alone.
    ///
    /// Example: chom schema export examples/chom/schemas
    Export {
        /// The folder to write (created if missing).
        dir: PathBuf,
        #[command(flatten)]
        dataschema: DataschemaArgs,
    },
    /// Compare the current schemas with a committed set and fail (exit 1)
    /// on a breaking change: a field removed or retyped, a new required
    /// field, an enum narrowed, a type removed. Additions pass; so does any
    /// change whose type's version was raised with an upcaster registered
    /// from the committed version.
    ///
    /// Example: chom schema check --against examples/chom/schemas
    Check {
        /// The committed folder (written by `chom schema export`).
        #[arg(long)]
        against: PathBuf,
    },
    /// Print the event catalog page (Markdown): per event type its
    /// description, version, fields, an example payload, its listeners and
    /// whether webhook endpoints can subscribe. CHOM commits it as
    /// docs/events.md.
    ///
    /// Example: chom schema catalog --out docs/events.md
    Catalog {
        /// Write the page here instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// Where the schemas are served.
#[derive(Debug, Args)]
pub(crate) struct DataschemaArgs {
    /// Base URI of the CloudEvents `dataschema` (and each schema's `$id`), as the relay's --dataschema-base [default: urn:outbox:schema:<event type>:v<version>].
    #[arg(long, env = outbox::contract::DATASCHEMA_BASE_ENV, hide_env_values = true)]
    pub(crate) dataschema_base: Option<String>,
}

/// Options of `chom asyncapi`.
#[derive(Debug, Args)]
pub(crate) struct AsyncapiArgs {
    /// Write the document here instead of stdout.
    #[arg(long)]
    pub(crate) out: Option<PathBuf>,
    /// The topic exchange the relay publishes to.
    #[arg(long, env = outbox::settings::EXCHANGE_ENV, default_value = outbox::DEFAULT_EXCHANGE, hide_env_values = true)]
    pub(crate) exchange: String,
    /// Queue name prefix (`<app>.<listener>`).
    #[arg(long, default_value = chom::listeners::APP)]
    pub(crate) app: String,
    /// The broker's host:port, for the document's server entry.
    #[arg(long, default_value = "127.0.0.1:5672")]
    pub(crate) host: String,
    #[command(flatten)]
    pub(crate) dataschema: DataschemaArgs,
}

/// The registry `chom work` runs by default (CHOM's listeners and the
/// webhook listeners), whose schemas and queues the contracts describe.
fn registry() -> Result<outbox::Registry> {
    chom::work::registry(&chom::work::WorkConfig::default()).context("building CHOM's registry")
}

/// CHOM's catalog page, as committed in docs/events.md.
fn catalog_page(registry: &outbox::Registry) -> String {
    outbox::contract::catalog::markdown(registry, &chom::events::catalog_options())
}

pub(crate) fn schema_command(command: SchemaCommand) -> Result<()> {
    let registry = registry()?;
    let schemas = registry.schema_set();
    match command {
        SchemaCommand::Catalog { out } => write_out(out.as_deref(), &catalog_page(&registry)),
        SchemaCommand::Export { dir, dataschema } => {
            let written = schemas
                .export(&dir, dataschema.dataschema_base.as_deref())
                .with_context(|| format!("exporting the schemas to {}", dir.display()))?;
            println!("{} schema(s) written to {}", written.len(), dir.display());
            Ok(())
        }
        SchemaCommand::Check { against } => check(&schemas, &against),
    }
}

fn check(current: &SchemaSet, against: &Path) -> Result<()> {
    let committed = SchemaSet::read_dir(against)
        .with_context(|| format!("reading the committed schemas in {}", against.display()))?;
    let report = compat::check(current, &committed);
    print!("{report}");
    if report.is_compatible() {
        Ok(())
    } else {
        bail!(
            "breaking change in {} against {}",
            report.breaking().join(", "),
            against.display()
        )
    }
}

pub(crate) fn asyncapi(args: AsyncapiArgs) -> Result<()> {
    let options = AsyncApiOptions {
        exchange: args.exchange,
        host: args.host,
        dataschema_base: args.dataschema.dataschema_base,
        version: env!("CARGO_PKG_VERSION").to_owned(),
        title: Some("CHOM events".to_owned()),
        ..AsyncApiOptions::new(args.app)
    };
    let document = document(&registry()?, &options).context("generating the AsyncAPI document")?;
    let mut text = serde_json::to_string_pretty(&document).context("rendering the AsyncAPI document")?;
    text.push('\n');
    write_out(args.out.as_deref(), &text)
}

/// Writes `text` to `out`, or to stdout.
fn write_out(out: Option<&Path>, text: &str) -> Result<()> {
    match out {
        Some(path) => std::fs::write(path, text).with_context(|| format!("writing {}", path.display())),
        None => std::io::stdout()
            .write_all(text.as_bytes())
            .context("writing to stdout"),
    }
}
