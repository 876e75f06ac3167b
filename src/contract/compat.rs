//! The compatibility check: the current schemas against a committed set.
//!
//! Consumers (other teams' listeners, webhook receivers) are written
//! against the committed schemas, and stored events keep the version they
//! were recorded with, so at an unchanged version a change must not break
//! either side:
//!
//! | change | verdict |
//! | --- | --- |
//! | a field removed | breaking |
//! | a field retyped (its `type` set or `format` changed) | breaking |
//! | a new required field, or an optional field made required | breaking |
//! | a required field made optional | breaking (consumers rely on it) |
//! | an enum narrowed (a value or a variant removed, or a free value constrained) | breaking |
//! | an event type removed | breaking |
//! | a version lowered | breaking |
//! | an optional field added, an enum widened, a new event type | compatible |
//! | the version raised, with an upcaster registered from every version in between | compatible, whatever changed |
//!
//! Nested objects, array items, map values and the variants of `anyOf` /
//! `oneOf` (Rust enums, `Option`s of structs) are compared the same way;
//! variants are matched by their tag (`const`, a one-value `enum`, a
//! property holding a `const`, or the single required property of an
//! externally tagged variant). Descriptions, titles, examples and bounds
//! are not compared.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde_json::{Map, Value};

use super::SchemaSet;

/// What changed at one place of a schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangeKind {
    /// A field is gone.
    FieldRemoved,
    /// An optional field is new.
    FieldAdded,
    /// A field is new and required, or was optional and is now required.
    NewRequiredField,
    /// A required field may now be missing.
    NoLongerRequired,
    /// The value's type changed.
    Retyped {
        /// The type before (`integer (int64)`).
        from: String,
        /// The type now.
        to: String,
    },
    /// Values (or variants) that were allowed are not any more.
    EnumNarrowed {
        /// The values no longer allowed (`*` for "any value").
        removed: Vec<String>,
    },
    /// Values (or variants) were added.
    EnumWidened {
        /// The values added.
        added: Vec<String>,
    },
}

impl ChangeKind {
    /// Whether the change breaks a consumer or a stored event.
    pub fn is_breaking(&self) -> bool {
        !matches!(self, Self::FieldAdded | Self::EnumWidened { .. })
    }
}

impl fmt::Display for ChangeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::FieldRemoved => f.write_str("field removed"),
            Self::FieldAdded => f.write_str("optional field added"),
            Self::NewRequiredField => f.write_str("new required field"),
            Self::NoLongerRequired => f.write_str("required field made optional"),
            Self::Retyped { from, to } => write!(f, "retyped from {from} to {to}"),
            Self::EnumNarrowed { removed } => {
                write!(f, "enum narrowed: {} no longer allowed", removed.join(", "))
            }
            Self::EnumWidened { added } => write!(f, "enum widened: {} added", added.join(", ")),
        }
    }
}

/// One change, at a path of the payload (`/domain`, `/tags/*`, `/kind(ssh)`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// Where: a JSON pointer into the payload; `*` stands for every array
    /// item or map value, `(tag)` for one variant.
    pub path: String,
    /// What.
    pub kind: ChangeKind,
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = if self.path.is_empty() { "/" } else { &self.path };
        write!(f, "{path}: {}", self.kind)
    }
}

/// The changes from schema `old` to schema `new`, breaking and not.
pub fn compare(old: &Value, new: &Value) -> Vec<Change> {
    let mut changes = Vec::new();
    compare_at("", old, new, &mut changes);
    changes
}

fn push(changes: &mut Vec<Change>, path: &str, kind: ChangeKind) {
    changes.push(Change {
        path: path.to_owned(),
        kind,
    });
}

fn compare_at(path: &str, old: &Value, new: &Value, changes: &mut Vec<Change>) {
    let empty = Map::new();
    let old_map = old.as_object().unwrap_or(&empty);
    let new_map = new.as_object().unwrap_or(&empty);

    let (old_type, new_type) = (type_label(old_map), type_label(new_map));
    if old_type != new_type {
        push(
            changes,
            path,
            ChangeKind::Retyped {
                from: old_type,
                to: new_type,
            },
        );
    }

    compare_allowed(path, allowed_values(old_map), allowed_values(new_map), changes);

    compare_properties(path, old_map, new_map, changes);

    for (keyword, segment) in [("items", "*"), ("additionalProperties", "*")] {
        if let (Some(old_sub @ Value::Object(_)), Some(new_sub @ Value::Object(_))) =
            (old_map.get(keyword), new_map.get(keyword))
        {
            compare_at(&format!("{path}/{segment}"), old_sub, new_sub, changes);
        }
    }

    compare_variants(path, old_map, new_map, changes);
}

fn compare_properties(
    path: &str,
    old: &Map<String, Value>,
    new: &Map<String, Value>,
    changes: &mut Vec<Change>,
) {
    let empty = Map::new();
    let old_properties = old.get("properties").and_then(Value::as_object).unwrap_or(&empty);
    let new_properties = new.get("properties").and_then(Value::as_object).unwrap_or(&empty);
    let (old_required, new_required) = (required(old), required(new));
    for (name, old_schema) in old_properties {
        let at = format!("{path}/{name}");
        match new_properties.get(name) {
            None => push(changes, &at, ChangeKind::FieldRemoved),
            Some(new_schema) => {
                match (old_required.contains(name), new_required.contains(name)) {
                    (false, true) => push(changes, &at, ChangeKind::NewRequiredField),
                    (true, false) => push(changes, &at, ChangeKind::NoLongerRequired),
                    _ => {}
                }
                compare_at(&at, old_schema, new_schema, changes);
            }
        }
    }
    for name in new_properties.keys().filter(|n| !old_properties.contains_key(*n)) {
        let at = format!("{path}/{name}");
        let kind = if new_required.contains(name) {
            ChangeKind::NewRequiredField
        } else {
            ChangeKind::FieldAdded
        };
        push(changes, &at, kind);
    }
}

fn compare_variants(
    path: &str,
    old: &Map<String, Value>,
    new: &Map<String, Value>,
    changes: &mut Vec<Change>,
) {
    let (old_variants, new_variants) = (variants(old), variants(new));
    let tags = |variants: &BTreeMap<String, Value>| {
        (!variants.is_empty()).then(|| variants.keys().cloned().collect::<BTreeSet<String>>())
    };
    compare_allowed(path, tags(&old_variants), tags(&new_variants), changes);
    for (key, old_variant) in &old_variants {
        if let Some(new_variant) = new_variants.get(key) {
            compare_at(&format!("{path}({key})"), old_variant, new_variant, changes);
        }
    }
}

/// What `old` allowed against what `new` allows (`None`: any value):
/// narrowed and widened.
fn compare_allowed(
    path: &str,
    old: Option<BTreeSet<String>>,
    new: Option<BTreeSet<String>>,
    changes: &mut Vec<Change>,
) {
    let any = || vec!["*".to_owned()];
    let (removed, added): (Vec<String>, Vec<String>) = match (old, new) {
        (Some(old), Some(new)) => (
            old.difference(&new).cloned().collect(),
            new.difference(&old).cloned().collect(),
        ),
        (None, Some(_)) => (any(), Vec::new()),
        (Some(_), None) => (Vec::new(), any()),
        (None, None) => return,
    };
    if !removed.is_empty() {
        push(changes, path, ChangeKind::EnumNarrowed { removed });
    }
    if !added.is_empty() {
        push(changes, path, ChangeKind::EnumWidened { added });
    }
}

/// `type` (a name or a list) with `format`, as one label: `integer (int64)`,
/// `null | string`, `any`.
fn type_label(schema: &Map<String, Value>) -> String {
    let types: BTreeSet<&str> = match schema.get("type") {
        Some(Value::String(t)) => BTreeSet::from([t.as_str()]),
        Some(Value::Array(list)) => list.iter().filter_map(Value::as_str).collect(),
        _ => BTreeSet::new(),
    };
    let mut label = if types.is_empty() {
        "any".to_owned()
    } else {
        types.into_iter().collect::<Vec<_>>().join(" | ")
    };
    if let Some(format) = schema.get("format").and_then(Value::as_str) {
        label.push_str(&format!(" ({format})"));
    }
    label
}

/// The values `enum` or `const` allow, as canonical JSON text.
fn allowed_values(schema: &Map<String, Value>) -> Option<BTreeSet<String>> {
    if let Some(Value::Array(values)) = schema.get("enum") {
        return Some(values.iter().map(canonical).collect());
    }
    schema.get("const").map(|v| BTreeSet::from([canonical(v)]))
}

fn required(schema: &Map<String, Value>) -> BTreeSet<String> {
    schema
        .get("required")
        .and_then(Value::as_array)
        .map(|names| {
            names
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// The variants of `anyOf` / `oneOf`, by tag.
fn variants(schema: &Map<String, Value>) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    for keyword in ["anyOf", "oneOf"] {
        if let Some(Value::Array(list)) = schema.get(keyword) {
            for variant in list {
                out.insert(variant_key(variant), variant.clone());
            }
        }
    }
    out
}

fn variant_key(variant: &Value) -> String {
    let Some(map) = variant.as_object() else {
        return canonical(variant);
    };
    if let Some(value) = map.get("const") {
        return canonical(value);
    }
    if let Some(Value::Array(values)) = map.get("enum")
        && values.len() == 1
    {
        return canonical(&values[0]);
    }
    if let Some(properties) = map.get("properties").and_then(Value::as_object) {
        // Internally or adjacently tagged: the property holding a constant.
        for (name, property) in properties {
            if let Some(tag) = property.get("const") {
                return format!("{name}={}", canonical(tag));
            }
            if let Some(Value::Array(values)) = property.get("enum")
                && values.len() == 1
            {
                return format!("{name}={}", canonical(&values[0]));
            }
        }
        // Externally tagged: `{"Variant": {...}}`.
        let required = required(map);
        if required.len() == 1 && properties.len() == 1 {
            return required.into_iter().next().unwrap_or_default();
        }
    }
    match map.get("type") {
        Some(Value::String(t)) => t.clone(),
        _ => canonical(variant),
    }
}

fn canonical(value: &Value) -> String {
    super::sorted(value.clone()).to_string()
}

/// What the check says about one event type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The same schema at the same version.
    Unchanged {
        /// The version.
        version: i32,
    },
    /// Changed at the same version, additions only.
    Compatible {
        /// The version.
        version: i32,
        /// What was added.
        changes: Vec<Change>,
    },
    /// The version was raised and an upcaster is registered from every
    /// version between the committed one and the current one.
    VersionRaised {
        /// The committed version.
        from: i32,
        /// The current one.
        to: i32,
    },
    /// Not in the committed set.
    New {
        /// Its current version.
        version: i32,
    },
    /// Breaks a consumer or a stored event.
    Breaking {
        /// Why, in one sentence.
        reason: String,
        /// The breaking changes (and the others), where schemas were compared.
        changes: Vec<Change>,
    },
}

/// The verdict on each event type, sorted by type.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// `(event type, verdict)`.
    pub verdicts: Vec<(String, Verdict)>,
}

impl Report {
    /// Whether nothing breaks.
    pub fn is_compatible(&self) -> bool {
        !self
            .verdicts
            .iter()
            .any(|(_, v)| matches!(v, Verdict::Breaking { .. }))
    }

    /// The types with a breaking change.
    pub fn breaking(&self) -> Vec<&str> {
        self.verdicts
            .iter()
            .filter(|(_, v)| matches!(v, Verdict::Breaking { .. }))
            .map(|(t, _)| t.as_str())
            .collect()
    }

    /// The verdict on `event_type`.
    pub fn verdict(&self, event_type: &str) -> Option<&Verdict> {
        self.verdicts
            .iter()
            .find(|(t, _)| t == event_type)
            .map(|(_, v)| v)
    }
}

impl fmt::Display for Report {
    /// One line per type (breaking ones first), each breaking change
    /// indented below its type.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (breaking, others): (Vec<_>, Vec<_>) = self
            .verdicts
            .iter()
            .partition(|(_, v)| matches!(v, Verdict::Breaking { .. }));
        for (event_type, verdict) in breaking.into_iter().chain(others) {
            match verdict {
                Verdict::Unchanged { version } => writeln!(f, "{event_type}: unchanged (v{version})")?,
                Verdict::Compatible { version, changes } => {
                    let list: Vec<String> = changes.iter().map(ToString::to_string).collect();
                    writeln!(f, "{event_type}: compatible (v{version}): {}", list.join("; "))?;
                }
                Verdict::VersionRaised { from, to } => writeln!(
                    f,
                    "{event_type}: version raised from v{from} to v{to}, with upcasters"
                )?,
                Verdict::New { version } => writeln!(f, "{event_type}: new (v{version})")?,
                Verdict::Breaking { reason, changes } => {
                    writeln!(f, "{event_type}: BREAKING: {reason}")?;
                    for change in changes.iter().filter(|c| c.kind.is_breaking()) {
                        writeln!(f, "  {change}")?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// Checks `current` (the registry's schemas and upcasters) against
/// `committed` (a folder exported earlier, [`SchemaSet::read_dir`]): each
/// type's newest committed version against its newest current one.
pub fn check(current: &SchemaSet, committed: &SchemaSet) -> Report {
    let types: BTreeSet<&str> = current.event_types().chain(committed.event_types()).collect();
    let verdicts = types
        .into_iter()
        .map(|event_type| (event_type.to_owned(), verdict(event_type, current, committed)))
        .collect();
    Report { verdicts }
}

fn verdict(event_type: &str, current: &SchemaSet, committed: &SchemaSet) -> Verdict {
    let (old, new) = match (committed.current(event_type), current.current(event_type)) {
        (None, Some(new)) => {
            return Verdict::New {
                version: new.version(),
            };
        }
        (Some(old), None) => {
            return Verdict::Breaking {
                reason: format!(
                    "the event type is gone (committed at v{}); consumers still expect it",
                    old.version()
                ),
                changes: Vec::new(),
            };
        }
        (Some(old), Some(new)) => (old, new),
        (None, None) => {
            return Verdict::Breaking {
                reason: "no schema on either side".into(),
                changes: Vec::new(),
            };
        }
    };
    let (from, to) = (old.version(), new.version());
    if to < from {
        return Verdict::Breaking {
            reason: format!("the version went back from v{from} to v{to}"),
            changes: Vec::new(),
        };
    }
    if to > from {
        let upcasters = current.upcasters_from(event_type);
        let missing: Vec<String> = (from..to)
            .filter(|v| !upcasters.contains(v))
            .map(|v| format!("v{v} -> v{}", v + 1))
            .collect();
        if missing.is_empty() {
            return Verdict::VersionRaised { from, to };
        }
        return Verdict::Breaking {
            reason: format!(
                "the version was raised from v{from} to v{to} without an upcaster for {} (register it with Registry::upcaster)",
                missing.join(", ")
            ),
            changes: compare(old.schema(), new.schema()),
        };
    }
    let changes = compare(old.schema(), new.schema());
    if changes.iter().any(|c| c.kind.is_breaking()) {
        Verdict::Breaking {
            reason: format!(
                "breaking change at v{from} (raise the version and register an upcaster from v{from}, or keep the change additive)"
            ),
            changes,
        }
    } else if changes.is_empty() {
        Verdict::Unchanged { version: from }
    } else {
        Verdict::Compatible {
            version: from,
            changes,
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::EventSchema;
    use super::*;

    type TestResult = std::result::Result<(), Box<dyn std::error::Error>>;

    fn object(properties: Value, required: &[&str]) -> Value {
        json!({"type": "object", "properties": properties, "required": required})
    }

    fn kinds(old: &Value, new: &Value) -> Vec<(String, ChangeKind)> {
        compare(old, new).into_iter().map(|c| (c.path, c.kind)).collect()
    }

    fn base() -> Value {
        object(
            json!({
                "site_id": {"type": "integer", "format": "int64"},
                "domain": {"type": "string"},
                "note": {"type": ["string", "null"]},
            }),
            &["site_id", "domain"],
        )
    }

    #[test]
    fn the_same_schema_has_no_changes() {
        assert!(compare(&base(), &base()).is_empty());
    }

    #[test]
    fn a_removed_field_is_breaking() {
        let new = object(
            json!({"site_id": {"type": "integer", "format": "int64"}, "note": {"type": ["string", "null"]}}),
            &["site_id"],
        );
        let changes = kinds(&base(), &new);
        assert_eq!(changes, vec![("/domain".into(), ChangeKind::FieldRemoved)]);
        assert!(changes[0].1.is_breaking());
    }

    #[test]
    fn a_retyped_field_is_breaking_type_and_format_alike() {
        let mut new = base();
        new["properties"]["site_id"] = json!({"type": "string"});
        assert_eq!(
            kinds(&base(), &new),
            vec![(
                "/site_id".into(),
                ChangeKind::Retyped {
                    from: "integer (int64)".into(),
                    to: "string".into()
                }
            )]
        );
        let mut narrower = base();
        narrower["properties"]["site_id"]["format"] = json!("int32");
        assert!(compare(&base(), &narrower).iter().all(|c| c.kind.is_breaking()));
        let mut nullable = base();
        nullable["properties"]["domain"] = json!({"type": ["string", "null"]});
        assert!(matches!(
            kinds(&base(), &nullable).as_slice(),
            [(path, ChangeKind::Retyped { .. })] if path == "/domain"
        ));
    }

    #[test]
    fn a_new_required_field_is_breaking_and_an_optional_one_is_not() {
        let mut required = base();
        required["properties"]["plan"] = json!({"type": "string"});
        required["required"] = json!(["site_id", "domain", "plan"]);
        assert_eq!(
            kinds(&base(), &required),
            vec![("/plan".into(), ChangeKind::NewRequiredField)]
        );
        let mut optional = base();
        optional["properties"]["plan"] = json!({"type": ["string", "null"]});
        let changes = kinds(&base(), &optional);
        assert_eq!(changes, vec![("/plan".into(), ChangeKind::FieldAdded)]);
        assert!(!changes[0].1.is_breaking());
    }

    #[test]
    fn making_a_field_required_or_optional_is_breaking() {
        let mut made_required = base();
        made_required["required"] = json!(["site_id", "domain", "note"]);
        assert_eq!(
            kinds(&base(), &made_required),
            vec![("/note".into(), ChangeKind::NewRequiredField)]
        );
        let mut made_optional = base();
        made_optional["required"] = json!(["site_id"]);
        assert_eq!(
            kinds(&base(), &made_optional),
            vec![("/domain".into(), ChangeKind::NoLongerRequired)]
        );
    }

    #[test]
    fn a_narrowed_enum_is_breaking_and_a_widened_one_is_not() {
        let with_roles = |roles: Value| object(json!({"role": {"type": "string", "enum": roles}}), &["role"]);
        let old = with_roles(json!(["admin", "member", "owner"]));
        assert_eq!(
            kinds(&old, &with_roles(json!(["admin", "member"]))),
            vec![(
                "/role".into(),
                ChangeKind::EnumNarrowed {
                    removed: vec!["\"owner\"".into()]
                }
            )]
        );
        let widened = kinds(&old, &with_roles(json!(["admin", "member", "owner", "viewer"])));
        assert_eq!(
            widened,
            vec![(
                "/role".into(),
                ChangeKind::EnumWidened {
                    added: vec!["\"viewer\"".into()]
                }
            )]
        );
        assert!(!widened[0].1.is_breaking());
        // A free string constrained to a list narrows it; the reverse widens.
        let free = object(json!({"role": {"type": "string"}}), &["role"]);
        assert!(compare(&free, &old).iter().any(|c| c.kind.is_breaking()));
        assert!(compare(&old, &free).iter().all(|c| !c.kind.is_breaking()));
    }

    #[test]
    fn nested_objects_items_and_variants_are_compared_too() {
        let old = object(
            json!({
                "owner": object(json!({"id": {"type": "integer"}, "email": {"type": "string"}}), &["id", "email"]),
                "tags": {"type": "array", "items": {"type": "string"}},
                "method": {"oneOf": [
                    {"type": "string", "const": "manual"},
                    {"type": "object", "properties": {"Ssh": {"type": "object", "properties": {"port": {"type": "integer"}}, "required": ["port"]}}, "required": ["Ssh"]},
                ]},
            }),
            &["owner", "tags", "method"],
        );
        let mut new = old.clone();
        new["properties"]["owner"]["properties"]
            .as_object_mut()
            .map(|p| p.remove("email"));
        new["properties"]["owner"]["required"] = json!(["id"]);
        new["properties"]["tags"]["items"] = json!({"type": "integer"});
        new["properties"]["method"]["oneOf"][1]["properties"]["Ssh"]["properties"]["port"] =
            json!({"type": "string"});
        new["properties"]["method"]["oneOf"][0] = json!({"type": "string", "const": "automatic"});
        let changes = kinds(&old, &new);
        let paths: Vec<&str> = changes.iter().map(|(p, _)| p.as_str()).collect();
        assert!(paths.contains(&"/owner/email"), "{changes:?}");
        assert!(paths.contains(&"/tags/*"), "{changes:?}");
        assert!(paths.contains(&"/method(Ssh)/Ssh/port"), "{changes:?}");
        assert!(
            changes.contains(&(
                "/method".into(),
                ChangeKind::EnumNarrowed {
                    removed: vec!["\"manual\"".into()]
                }
            )),
            "{changes:?}"
        );
        // An added variant alone is compatible.
        let mut more = old.clone();
        if let Some(list) = more["properties"]["method"]["oneOf"].as_array_mut() {
            list.push(json!({"type": "string", "const": "automatic"}));
        }
        assert!(compare(&old, &more).iter().all(|c| !c.kind.is_breaking()));
    }

    #[test]
    fn descriptions_and_titles_are_not_changes() {
        let mut new = base();
        new["description"] = json!("A site was created.");
        new["properties"]["domain"]["description"] = json!("The domain.");
        new["title"] = json!("SiteCreated");
        assert!(compare(&base(), &new).is_empty());
    }

    fn set(
        schemas: &[(&str, i32, Value)],
        upcasters: &[(&str, i32)],
    ) -> std::result::Result<SchemaSet, crate::Error> {
        let mut set = SchemaSet::new();
        for (event_type, version, schema) in schemas {
            set.add(EventSchema::new(event_type, *version, schema.clone())?)?;
        }
        for (event_type, from) in upcasters {
            set.add_upcaster(event_type, *from);
        }
        Ok(set)
    }

    #[test]
    fn the_check_refuses_a_breaking_change_unless_the_version_was_raised_with_an_upcaster() -> TestResult {
        let committed = set(&[("site.created", 1, base())], &[])?;
        let mut broken = base();
        broken["properties"].as_object_mut().map(|p| p.remove("domain"));
        broken["required"] = json!(["site_id"]);

        let same_version = check(&set(&[("site.created", 1, broken.clone())], &[])?, &committed);
        assert!(!same_version.is_compatible());
        assert_eq!(same_version.breaking(), vec!["site.created"]);
        let text = same_version.to_string();
        assert!(
            text.contains("site.created: BREAKING: breaking change at v1"),
            "{text}"
        );
        assert!(text.contains("  /domain: field removed"), "{text}");

        let raised_without = check(&set(&[("site.created", 2, broken.clone())], &[])?, &committed);
        assert!(!raised_without.is_compatible());
        assert!(
            raised_without
                .to_string()
                .contains("without an upcaster for v1 -> v2")
        );

        let raised_with = check(
            &set(&[("site.created", 2, broken.clone())], &[("site.created", 1)])?,
            &committed,
        );
        assert!(raised_with.is_compatible(), "{raised_with}");
        assert_eq!(
            raised_with.verdict("site.created"),
            Some(&Verdict::VersionRaised { from: 1, to: 2 })
        );

        // Two versions up: a step from each version in between.
        let gap = check(
            &set(&[("site.created", 3, broken)], &[("site.created", 2)])?,
            &committed,
        );
        assert!(
            gap.to_string().contains("without an upcaster for v1 -> v2"),
            "{gap}"
        );
        Ok(())
    }

    #[test]
    fn the_check_passes_additions_and_new_types_and_refuses_removed_types_and_lowered_versions() -> TestResult
    {
        let committed = set(&[("site.created", 2, base()), ("site.deleted", 1, base())], &[])?;
        let mut added = base();
        added["properties"]["plan"] = json!({"type": ["string", "null"]});
        let current = set(
            &[
                ("site.created", 2, added),
                ("site.deleted", 1, base()),
                ("backup.created", 1, base()),
            ],
            &[],
        )?;
        let report = check(&current, &committed);
        assert!(report.is_compatible(), "{report}");
        assert!(matches!(
            report.verdict("site.created"),
            Some(Verdict::Compatible { version: 2, .. })
        ));
        assert_eq!(
            report.verdict("site.deleted"),
            Some(&Verdict::Unchanged { version: 1 })
        );
        assert_eq!(
            report.verdict("backup.created"),
            Some(&Verdict::New { version: 1 })
        );

        let gone = check(&set(&[("site.created", 2, base())], &[])?, &committed);
        assert_eq!(gone.breaking(), vec!["site.deleted"]);
        let lowered = check(
            &set(&[("site.created", 1, base()), ("site.deleted", 1, base())], &[])?,
            &committed,
        );
        assert!(lowered.to_string().contains("went back from v2 to v1"));
        Ok(())
    }
}
