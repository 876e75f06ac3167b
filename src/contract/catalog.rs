//! An event catalog page (Markdown) generated from a registry: one entry
//! per event type with its description, version, `dataschema`, fields,
//! an example payload, who produces it, its listeners and whether webhook
//! endpoints can subscribe to it. A service commits the page and a test
//! keeps it equal to what the code generates (CHOM: `docs/events.md`).

use std::fmt::Write as _;

use serde_json::{Map, Value, json};

use super::{dataschema_uri, render, schema_file_name};
use crate::registry::Registry;

/// What the page says beyond the registry.
#[derive(Debug, Clone)]
pub struct CatalogOptions {
    /// The page's title.
    pub title: String,
    /// Who records the events (`CHOM's services, chom::services`).
    pub producer: String,
    /// Where the exported schema files are, relative to the page
    /// (`../examples/chom/schemas`), to link each; `None`: no links.
    pub schema_folder: Option<String>,
    /// The `dataschema` base the relay uses.
    pub dataschema_base: Option<String>,
}

/// The queued listener whose registration makes an event type available
/// to webhook endpoints.
#[cfg(feature = "webhooks")]
const FANOUT_LISTENER: Option<&str> = Some(crate::webhooks::FANOUT_LISTENER);
#[cfg(not(feature = "webhooks"))]
const FANOUT_LISTENER: Option<&str> = None;

/// The catalog page of `registry`'s event types with a schema.
pub fn markdown(registry: &Registry, options: &CatalogOptions) -> String {
    let schemas = registry.schema_set();
    let webhooks = |event_type: &str| {
        FANOUT_LISTENER.is_some_and(|fanout| {
            registry
                .queued_listener_named(fanout)
                .is_some_and(|r| r.handles(event_type))
        })
    };
    let listeners = |event_type: &str| -> Vec<String> {
        registry
            .listeners_for(event_type)
            .into_iter()
            .filter(|(name, _)| Some(*name) != FANOUT_LISTENER)
            .map(|(name, queued)| format!("`{name}` ({})", if queued { "queued" } else { "sync" }))
            .collect()
    };
    let mut page = String::new();
    let _ = writeln!(page, "# {}\n", options.title);
    let _ = writeln!(
        page,
        "Generated from the service's registry by `outbox::contract::catalog`; do not edit by hand. Every event is published as a CloudEvents 1.0 structured JSON document whose `type` is the event type (also the routing key) and whose `data` is the payload below.\n"
    );
    let _ = writeln!(page, "| event type | version | listeners | webhooks |");
    let _ = writeln!(page, "| --- | --- | --- | --- |");
    for schema in schemas.event_types().filter_map(|t| schemas.current(t)) {
        let event_type = schema.event_type();
        let _ = writeln!(
            page,
            "| [`{event_type}`](#{}) | {} | {} | {} |",
            event_type.replace(['.', '_'], ""),
            schema.version(),
            listeners(event_type).join(", "),
            if webhooks(event_type) { "yes" } else { "no" }
        );
    }
    for schema in schemas.event_types().filter_map(|t| schemas.current(t)) {
        let (event_type, version, body) = (schema.event_type(), schema.version(), schema.schema());
        let _ = writeln!(page, "\n## {event_type}\n");
        if let Some(description) = body.get("description").and_then(Value::as_str) {
            let _ = writeln!(page, "{}\n", description.replace('\n', " "));
        }
        let uri = dataschema_uri(options.dataschema_base.as_deref(), event_type, version);
        let _ = writeln!(page, "- schema version: {version}");
        match &options.schema_folder {
            Some(folder) => {
                let file = schema_file_name(event_type, version);
                let _ = writeln!(
                    page,
                    "- schema: [`{file}`]({folder}/{file}), `dataschema` `{uri}`"
                );
            }
            None => {
                let _ = writeln!(page, "- `dataschema`: `{uri}`");
            }
        }
        let _ = writeln!(page, "- produced by: {}", options.producer);
        let names = listeners(event_type);
        let _ = writeln!(
            page,
            "- listeners: {}",
            if names.is_empty() {
                "none".to_owned()
            } else {
                names.join(", ")
            }
        );
        let _ = writeln!(
            page,
            "- webhooks: {}",
            if webhooks(event_type) {
                format!("endpoints can subscribe (`outbox webhooks add --event-type {event_type}`)")
            } else {
                "not offered".to_owned()
            }
        );
        let _ = writeln!(page, "\n| field | type | required | description |");
        let _ = writeln!(page, "| --- | --- | --- | --- |");
        let empty = Map::new();
        let properties = body
            .get("properties")
            .and_then(Value::as_object)
            .unwrap_or(&empty);
        let required: Vec<&str> = body
            .get("required")
            .and_then(Value::as_array)
            .map(|r| r.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        for (name, property) in properties {
            let _ = writeln!(
                page,
                "| `{name}` | {} | {} | {} |",
                type_text(property),
                if required.contains(&name.as_str()) {
                    "yes"
                } else {
                    "no"
                },
                property
                    .get("description")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .replace('\n', " ")
                    .replace('|', "\\|")
            );
        }
        let _ = writeln!(
            page,
            "\nExample payload:\n\n```json\n{}```",
            render(&example(body))
        );
    }
    page
}

/// `integer (int64)`, `string or null`, `one of "a", "b"`.
fn type_text(schema: &Value) -> String {
    if let Some(values) = schema.get("enum").and_then(Value::as_array) {
        let list: Vec<String> = values.iter().map(Value::to_string).collect();
        return format!("one of {}", list.join(", "));
    }
    let types: Vec<&str> = match schema.get("type") {
        Some(Value::String(t)) => vec![t.as_str()],
        Some(Value::Array(list)) => list.iter().filter_map(Value::as_str).collect(),
        _ => vec!["any"],
    };
    let mut text = types.join(" or ");
    if let Some(format) = schema.get("format").and_then(Value::as_str) {
        let _ = write!(text, " ({format})");
    }
    text
}

/// A payload that fits `schema`, made from its types alone.
pub fn example(schema: &Value) -> Value {
    if let Some(value) = schema.get("const") {
        return value.clone();
    }
    if let Some(first) = schema
        .get("enum")
        .and_then(Value::as_array)
        .and_then(|v| v.first())
    {
        return first.clone();
    }
    for keyword in ["oneOf", "anyOf"] {
        if let Some(first) = schema
            .get(keyword)
            .and_then(Value::as_array)
            .and_then(|v| v.first())
        {
            return example(first);
        }
    }
    let kind = match schema.get("type") {
        Some(Value::String(t)) => t.as_str(),
        Some(Value::Array(list)) => list
            .iter()
            .filter_map(Value::as_str)
            .find(|t| *t != "null")
            .unwrap_or("null"),
        _ => "null",
    };
    match kind {
        "object" => {
            let empty = Map::new();
            let properties = schema
                .get("properties")
                .and_then(Value::as_object)
                .unwrap_or(&empty);
            Value::Object(properties.iter().map(|(k, v)| (k.clone(), example(v))).collect())
        }
        "array" => Value::Array(schema.get("items").map(example).into_iter().collect()),
        "integer" => json!(1),
        "number" => json!(1.5),
        "boolean" => json!(true),
        "string" => match schema.get("format").and_then(Value::as_str) {
            Some("date-time") => json!("2026-01-01T12:00:00Z"),
            Some("uuid") => json!("01900000-0000-7000-8000-000000000000"),
            _ => json!("text"),
        },
        _ => Value::Null,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type TestResult = std::result::Result<(), Box<dyn std::error::Error>>;

    /// A backup finished.
    #[derive(schemars::JsonSchema, serde::Serialize)]
    #[allow(dead_code)]
    struct BackupCompleted {
        /// The backup's id.
        backup_id: i64,
        /// When it finished.
        finished_at: chrono::DateTime<chrono::Utc>,
        note: Option<String>,
    }

    #[test]
    fn each_type_has_its_entry_and_its_example_fits_its_schema() -> TestResult {
        let registry = Registry::new().event_schema::<BackupCompleted>("backup.completed", 1)?;
        let page = markdown(
            &registry,
            &CatalogOptions {
                title: "Events".into(),
                producer: "the backup service".into(),
                schema_folder: Some("../schemas".into()),
                dataschema_base: None,
            },
        );
        assert!(
            page.contains("| [`backup.completed`](#backupcompleted) | 1 |  | no |"),
            "{page}"
        );
        assert!(
            page.contains("\n## backup.completed\n\nA backup finished.\n"),
            "{page}"
        );
        assert!(
            page.contains("[`backup.completed.v1.schema.json`](../schemas/backup.completed.v1.schema.json)")
        );
        assert!(
            page.contains("| `backup_id` | integer (int64) | yes | The backup's id. |"),
            "{page}"
        );
        assert!(page.contains("| `note` | string or null | no |  |"), "{page}");
        let schema = registry.schemas().get("backup.completed", 1).ok_or("no schema")?;
        schema.validate(&example(schema.schema()))?;
        Ok(())
    }
}
