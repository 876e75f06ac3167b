//! Event contracts: a JSON Schema for each event type and payload version,
//! derived from the Rust type, and what is built on them.
//!
//! A service registers each event type's payload type with its version
//! ([`Registry::event_schema`](crate::Registry::event_schema)); the schema
//! is derived with [`schemars`] (JSON Schema draft-07, every subschema
//! inlined so a schema stands alone, which also lets it sit inside an
//! AsyncAPI document unchanged). From there:
//!
//! - [`SchemaSet::export`] writes one file per type and version,
//!   `<event type>.v<version>.schema.json` (pretty JSON, keys sorted, so
//!   the same registry writes the same bytes), for a service to commit;
//! - every CloudEvent names its schema in `dataschema`
//!   ([`dataschema_uri`]), which is also the file's `$id`;
//! - a fake outbox (and, with feature `testing`, every outbox) checks each
//!   recorded payload against its schema ([`Error::SchemaViolation`]);
//! - [`compat::check`] compares the current schemas with a committed set and
//!   refuses breaking changes unless the version was raised with an
//!   upcaster ([`compat`]);
//! - [`asyncapi::document`] describes the exchange, the routing keys, the
//!   listeners' queues and the messages as an AsyncAPI 3.0 document;
//! - [`catalog::markdown`] writes an event catalog page (description,
//!   fields, example, producer, listeners, webhooks per type).
//!
//! [`Error::SchemaViolation`]: crate::Error::SchemaViolation

pub mod asyncapi;
pub mod catalog;
pub mod compat;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{Map, Value};

use crate::envelope::is_valid_event_type;
use crate::error::{Error, Result};
use crate::upcast::Upcasters;

/// The default start of `dataschema` URIs when none is configured:
/// `urn:outbox:schema:<event type>:v<version>`.
pub const DEFAULT_DATASCHEMA_PREFIX: &str = "urn:outbox:schema:";
/// Environment variable of the `dataschema` base (`outbox relay
/// --dataschema-base`).
pub const DATASCHEMA_BASE_ENV: &str = "OUTBOX_DATASCHEMA_BASE";
/// The JSON Schema draft of every schema: draft-07.
pub const JSON_SCHEMA_DRAFT: &str = "http://json-schema.org/draft-07/schema#";
/// Extension keyword of an exported schema: its event type.
pub const EVENT_TYPE_KEYWORD: &str = "x-outbox-event-type";
/// Extension keyword of an exported schema: its payload version.
pub const SCHEMA_VERSION_KEYWORD: &str = "x-outbox-schema-version";
/// Extension keyword of an exported schema: the versions its type has
/// upcasters from (the step `v -> v + 1` for each `v` listed).
pub const UPCASTERS_KEYWORD: &str = "x-outbox-upcasters-from";

/// The CloudEvents `dataschema` of `event_type` at `version`: with a
/// `base` (`https://schemas.example.com/chom/`), the base followed by the
/// exported file's name (so serving the exported folder at the base
/// serves every schema); without one, `urn:outbox:schema:<type>:v<version>`.
pub fn dataschema_uri(base: Option<&str>, event_type: &str, version: i32) -> String {
    match base.filter(|b| !b.is_empty()) {
        Some(base) if base.ends_with('/') => format!("{base}{}", schema_file_name(event_type, version)),
        Some(base) => format!("{base}/{}", schema_file_name(event_type, version)),
        None => format!("{DEFAULT_DATASCHEMA_PREFIX}{event_type}:v{version}"),
    }
}

/// The file an exported schema is written to: `site.created.v1.schema.json`.
pub fn schema_file_name(event_type: &str, version: i32) -> String {
    format!("{event_type}.v{version}.schema.json")
}

/// The JSON Schema of `T` as every contract uses it: draft-07, subschemas
/// inlined (no `$ref`), so it stands alone.
pub fn schema_of<T: schemars::JsonSchema + ?Sized>() -> Value {
    let mut settings = schemars::generate::SchemaSettings::draft07();
    settings.inline_subschemas = true;
    settings.into_generator().into_root_schema_for::<T>().to_value()
}

/// One event type's payload schema at one version, compiled for
/// validation.
#[derive(Clone)]
pub struct EventSchema {
    event_type: String,
    version: i32,
    schema: Value,
    validator: Arc<jsonschema::Validator>,
}

impl fmt::Debug for EventSchema {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventSchema")
            .field("event_type", &self.event_type)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

impl EventSchema {
    /// `schema` as the payload schema of `event_type` at `version`. Fails
    /// on a bad type name, a version below 1 or a schema that does not
    /// compile.
    pub fn new(event_type: &str, version: i32, schema: Value) -> Result<Self> {
        if !is_valid_event_type(event_type) {
            return Err(Error::Config(format!(
                "schema for {event_type:?}, which is not a dotted lower-case event type"
            )));
        }
        if version < 1 {
            return Err(Error::Config(format!(
                "schema of {event_type} at version {version}: versions start at 1"
            )));
        }
        let validator = jsonschema::draft7::new(&schema).map_err(|e| {
            Error::Config(format!(
                "the schema of {event_type} v{version} is not a valid JSON Schema: {e}"
            ))
        })?;
        Ok(Self {
            event_type: event_type.to_owned(),
            version,
            schema,
            validator: Arc::new(validator),
        })
    }

    /// The event type.
    pub fn event_type(&self) -> &str {
        &self.event_type
    }

    /// The payload version.
    pub fn version(&self) -> i32 {
        self.version
    }

    /// The schema as derived (without the export's `$id` and extension
    /// keywords).
    pub fn schema(&self) -> &Value {
        &self.schema
    }

    /// Checks `payload` against the schema: the first violation, with the
    /// JSON pointer of the failing value (`/domain`, `""` for the whole
    /// payload), as [`Error::SchemaViolation`].
    pub fn validate(&self, payload: &Value) -> Result<()> {
        match self.validator.validate(payload) {
            Ok(()) => Ok(()),
            Err(error) => Err(Error::SchemaViolation {
                event_type: self.event_type.clone(),
                schema_version: self.version,
                path: error.instance_path().as_str().to_owned(),
                reason: error.masked().to_string(),
            }),
        }
    }
}

/// The payload schemas of a registry (or of an exported folder), by type
/// and version, with the upcaster steps each type has.
#[derive(Debug, Clone, Default)]
pub struct SchemaSet {
    schemas: BTreeMap<String, BTreeMap<i32, EventSchema>>,
    upcasters: BTreeMap<String, BTreeSet<i32>>,
}

impl SchemaSet {
    /// No schemas.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `schema`. Fails if its type already has one at its version.
    pub fn add(&mut self, schema: EventSchema) -> Result<()> {
        let versions = self.schemas.entry(schema.event_type.clone()).or_default();
        if versions.contains_key(&schema.version) {
            return Err(Error::Config(format!(
                "{} already has a schema at version {}",
                schema.event_type, schema.version
            )));
        }
        versions.insert(schema.version, schema);
        Ok(())
    }

    /// Records that `event_type` has an upcaster from `from_version`.
    pub fn add_upcaster(&mut self, event_type: &str, from_version: i32) {
        self.upcasters
            .entry(event_type.to_owned())
            .or_default()
            .insert(from_version);
    }

    /// This set with the upcaster steps of `upcasters`.
    #[must_use]
    pub fn with_upcasters(mut self, upcasters: &Upcasters) -> Self {
        for (event_type, from) in upcasters.steps() {
            self.add_upcaster(&event_type, from);
        }
        self
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.schemas.is_empty()
    }

    /// The event types with a schema, sorted.
    pub fn event_types(&self) -> impl Iterator<Item = &str> {
        self.schemas.keys().map(String::as_str)
    }

    /// The schema of `event_type` at `version`.
    pub fn get(&self, event_type: &str, version: i32) -> Option<&EventSchema> {
        self.schemas.get(event_type)?.get(&version)
    }

    /// The versions `event_type` has a schema for, oldest first.
    pub fn versions(&self, event_type: &str) -> Vec<i32> {
        self.schemas
            .get(event_type)
            .map(|v| v.keys().copied().collect())
            .unwrap_or_default()
    }

    /// The schema of `event_type`'s newest version.
    pub fn current(&self, event_type: &str) -> Option<&EventSchema> {
        self.schemas.get(event_type)?.values().next_back()
    }

    /// Every schema, by type then version.
    pub fn iter(&self) -> impl Iterator<Item = &EventSchema> {
        self.schemas.values().flat_map(BTreeMap::values)
    }

    /// The versions `event_type` has upcasters from.
    pub fn upcasters_from(&self, event_type: &str) -> BTreeSet<i32> {
        self.upcasters.get(event_type).cloned().unwrap_or_default()
    }

    /// Checks `payload` of `event_type` at `version` against its schema.
    /// A type without any schema passes (nothing to check against); a
    /// type with schemas but none at `version` is
    /// [`Error::UnknownSchemaVersion`].
    pub fn validate(&self, event_type: &str, version: i32, payload: &Value) -> Result<()> {
        let Some(versions) = self.schemas.get(event_type) else {
            return Ok(());
        };
        match versions.get(&version) {
            Some(schema) => schema.validate(payload),
            None => Err(Error::UnknownSchemaVersion {
                event_type: event_type.to_owned(),
                schema_version: version,
                known: versions.keys().copied().collect(),
            }),
        }
    }

    /// The document exported for `schema`: the schema with `$id` (its
    /// `dataschema`, see [`dataschema_uri`]), its type, version and its
    /// type's upcaster steps as extension keywords, keys sorted.
    pub fn exported_document(&self, schema: &EventSchema, dataschema_base: Option<&str>) -> Value {
        let mut document = match schema.schema.clone() {
            Value::Object(map) => map,
            other => {
                let mut map = Map::new();
                map.insert("allOf".into(), Value::Array(vec![other]));
                map
            }
        };
        document.insert(
            "$id".into(),
            Value::String(dataschema_uri(
                dataschema_base,
                &schema.event_type,
                schema.version,
            )),
        );
        document.insert("$schema".into(), Value::String(JSON_SCHEMA_DRAFT.into()));
        document.insert(
            EVENT_TYPE_KEYWORD.into(),
            Value::String(schema.event_type.clone()),
        );
        document.insert(SCHEMA_VERSION_KEYWORD.into(), Value::from(schema.version));
        let upcasters = self.upcasters_from(&schema.event_type);
        if !upcasters.is_empty() {
            document.insert(
                UPCASTERS_KEYWORD.into(),
                Value::Array(upcasters.into_iter().map(Value::from).collect()),
            );
        }
        sorted(Value::Object(document))
    }

    /// Writes one file per type and version into `dir` (created if
    /// missing), as [`SchemaSet::exported_document`] renders them, and
    /// returns the paths written. Other files in `dir` are left alone:
    /// a committed folder keeps the schemas of older versions.
    pub fn export(&self, dir: &Path, dataschema_base: Option<&str>) -> Result<Vec<PathBuf>> {
        std::fs::create_dir_all(dir).map_err(|e| io_error("create", dir, &e))?;
        let mut written = Vec::new();
        for schema in self.iter() {
            let path = dir.join(schema_file_name(&schema.event_type, schema.version));
            let text = render(&self.exported_document(schema, dataschema_base));
            std::fs::write(&path, text).map_err(|e| io_error("write", &path, &e))?;
            written.push(path);
        }
        Ok(written)
    }

    /// The exported file contents of every schema, by file name: what
    /// [`SchemaSet::export`] writes.
    pub fn exported_files(&self, dataschema_base: Option<&str>) -> BTreeMap<String, String> {
        self.iter()
            .map(|schema| {
                (
                    schema_file_name(&schema.event_type, schema.version),
                    render(&self.exported_document(schema, dataschema_base)),
                )
            })
            .collect()
    }

    /// Reads the `*.schema.json` files of `dir` (an exported folder): each
    /// file's type and version come from its extension keywords, checked
    /// against its name.
    pub fn read_dir(dir: &Path) -> Result<Self> {
        let entries = std::fs::read_dir(dir).map_err(|e| io_error("read", dir, &e))?;
        let mut paths: Vec<PathBuf> = Vec::new();
        for entry in entries {
            let path = entry.map_err(|e| io_error("read", dir, &e))?.path();
            if path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.ends_with(".schema.json"))
            {
                paths.push(path);
            }
        }
        paths.sort();
        let mut set = Self::new();
        for path in paths {
            let text = std::fs::read_to_string(&path).map_err(|e| io_error("read", &path, &e))?;
            let document: Value = serde_json::from_str(&text)
                .map_err(|e| Error::InvalidInput(format!("{} is not JSON: {e}", path.display())))?;
            let bad = |what: &str| Error::InvalidInput(format!("{}: {what}", path.display()));
            let event_type = document
                .get(EVENT_TYPE_KEYWORD)
                .and_then(Value::as_str)
                .ok_or_else(|| bad(&format!("no {EVENT_TYPE_KEYWORD}")))?
                .to_owned();
            let version = document
                .get(SCHEMA_VERSION_KEYWORD)
                .and_then(Value::as_i64)
                .and_then(|v| i32::try_from(v).ok())
                .ok_or_else(|| bad(&format!("no {SCHEMA_VERSION_KEYWORD}")))?;
            let expected = schema_file_name(&event_type, version);
            if path.file_name().and_then(|n| n.to_str()) != Some(expected.as_str()) {
                return Err(bad(&format!(
                    "holds {event_type} v{version}, whose file is {expected}"
                )));
            }
            if let Some(steps) = document.get(UPCASTERS_KEYWORD).and_then(Value::as_array) {
                for from in steps.iter().filter_map(Value::as_i64) {
                    if let Ok(from) = i32::try_from(from) {
                        set.add_upcaster(&event_type, from);
                    }
                }
            }
            let mut schema = document;
            if let Value::Object(map) = &mut schema {
                for keyword in [
                    "$id",
                    EVENT_TYPE_KEYWORD,
                    SCHEMA_VERSION_KEYWORD,
                    UPCASTERS_KEYWORD,
                ] {
                    map.remove(keyword);
                }
            }
            set.add(EventSchema::new(&event_type, version, schema).map_err(|e| bad(&e.to_string()))?)?;
        }
        Ok(set)
    }
}

fn io_error(what: &str, path: &Path, error: &std::io::Error) -> Error {
    Error::InvalidInput(format!("cannot {what} {}: {error}", path.display()))
}

/// `value` with every object's keys in sorted order, whatever serde_json's
/// map keeps.
pub(crate) fn sorted(value: Value) -> Value {
    match value {
        Value::Object(map) => {
            let entries: BTreeMap<String, Value> = map.into_iter().map(|(k, v)| (k, sorted(v))).collect();
            Value::Object(entries.into_iter().collect())
        }
        Value::Array(items) => Value::Array(items.into_iter().map(sorted).collect()),
        other => other,
    }
}

/// Pretty JSON with a final newline, as files are written.
pub(crate) fn render(value: &Value) -> String {
    let mut text = serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string());
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    type TestResult = std::result::Result<(), Box<dyn std::error::Error>>;

    #[derive(schemars::JsonSchema, serde::Serialize)]
    #[allow(dead_code)]
    struct SiteCreated {
        site_id: i64,
        domain: String,
        note: Option<String>,
    }

    #[test]
    fn a_derived_schema_is_draft_07_without_refs_and_validates_payloads() -> TestResult {
        let schema = EventSchema::new("site.created", 1, schema_of::<SiteCreated>())?;
        assert_eq!(schema.schema()["$schema"], JSON_SCHEMA_DRAFT);
        assert!(!schema.schema().to_string().contains("$ref"));
        schema.validate(&json!({"site_id": 7, "domain": "a.test", "note": null}))?;
        let violation = schema
            .validate(&json!({"site_id": "7", "domain": "a.test"}))
            .err();
        match violation {
            Some(Error::SchemaViolation {
                event_type,
                schema_version,
                path,
                ..
            }) => {
                assert_eq!(
                    (event_type.as_str(), schema_version, path.as_str()),
                    ("site.created", 1, "/site_id")
                );
            }
            other => panic!("expected a schema violation, got {other:?}"),
        }
        Ok(())
    }

    #[test]
    fn dataschema_uris_follow_the_base_or_default_to_a_urn() {
        assert_eq!(
            dataschema_uri(None, "site.created", 2),
            "urn:outbox:schema:site.created:v2"
        );
        assert_eq!(
            dataschema_uri(Some("https://s.example/chom"), "site.created", 1),
            "https://s.example/chom/site.created.v1.schema.json"
        );
        assert_eq!(
            dataschema_uri(Some("https://s.example/chom/"), "site.created", 1),
            "https://s.example/chom/site.created.v1.schema.json"
        );
    }

    #[test]
    fn an_export_reads_back_the_same_and_is_byte_for_byte_stable() -> TestResult {
        let mut set = SchemaSet::new();
        set.add(EventSchema::new("site.created", 2, schema_of::<SiteCreated>())?)?;
        set.add_upcaster("site.created", 1);
        let dir = std::env::temp_dir().join(format!("outbox-schema-export-{}", uuid::Uuid::now_v7()));
        let written = set.export(&dir, None)?;
        assert_eq!(written, vec![dir.join("site.created.v2.schema.json")]);
        let first = std::fs::read_to_string(&written[0])?;
        set.export(&dir, None)?;
        assert_eq!(std::fs::read_to_string(&written[0])?, first);
        assert!(first.contains("\"$id\": \"urn:outbox:schema:site.created:v2\""));
        let read = SchemaSet::read_dir(&dir)?;
        assert_eq!(read.versions("site.created"), vec![2]);
        assert_eq!(read.upcasters_from("site.created"), BTreeSet::from([1]));
        assert_eq!(read.exported_files(None), set.exported_files(None));
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[test]
    fn unknown_versions_are_refused_and_types_without_schemas_pass() -> TestResult {
        let mut set = SchemaSet::new();
        set.add(EventSchema::new("site.created", 1, schema_of::<SiteCreated>())?)?;
        assert!(matches!(
            set.validate("site.created", 2, &json!({})),
            Err(Error::UnknownSchemaVersion {
                schema_version: 2,
                ..
            })
        ));
        set.validate("backup.created", 1, &json!({"anything": true}))?;
        assert!(set.add(EventSchema::new("site.created", 1, json!({}))?).is_err());
        Ok(())
    }
}
