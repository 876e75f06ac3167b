//! CHOM's event contracts: the committed schemas (examples/chom/schemas)
//! are what the code exports and pass the compatibility check; a breaking
//! change is refused, and accepted with a version bump and an upcaster;
//! fake outboxes check payloads against the schemas; the AsyncAPI document
//! passes the official parser (`@asyncapi/parser`, installed from npm under
//! target/).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use chom::events::{EVENT_TYPES, SITE_CREATED};
use chom::listeners::{ListenerConfig, registry};
use outbox::contract::asyncapi::{AsyncApiOptions, document};
use outbox::contract::compat::{self, Verdict};
use outbox::contract::{SchemaSet, schema_file_name};
use outbox::{DomainEvent, Metadata, Outbox, Registry};
use serde::Serialize;

fn committed_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas")
}

fn current() -> SchemaSet {
    registry(&ListenerConfig::default()).unwrap().schema_set()
}

/// What `chom <args>` prints on stdout; it must succeed.
fn chom_stdout(args: &[&str]) -> Vec<u8> {
    let out = Command::new(env!("CARGO_BIN_EXE_chom"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "chom {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// A fresh folder under target/ for one test, removed by the caller.
fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn every_event_type_has_a_schema_and_the_committed_files_are_what_the_code_exports() {
    let current = current();
    for event_type in EVENT_TYPES {
        assert_eq!(current.versions(event_type), vec![1], "{event_type}");
    }
    let committed: BTreeMap<String, String> = std::fs::read_dir(committed_dir())
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".schema.json"))
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read_to_string(&p).unwrap())
        })
        .collect();
    for (name, text) in current.exported_files(None) {
        assert_eq!(
            committed.get(&name),
            Some(&text),
            "examples/chom/schemas/{name} is not what the code exports: run `cargo run -p chom -- schema export examples/chom/schemas` and commit it (after `chom schema check` passes)"
        );
    }
}

#[test]
fn the_committed_schemas_pass_the_compatibility_check() {
    let committed = SchemaSet::read_dir(&committed_dir()).unwrap();
    let report = compat::check(&current(), &committed);
    assert!(report.is_compatible(), "{report}");
    for event_type in EVENT_TYPES {
        assert_eq!(
            report.verdict(event_type),
            Some(&Verdict::Unchanged { version: 1 })
        );
    }
}

/// site.created with `domain` renamed: a field removed, a new required one.
#[derive(Serialize, schemars::JsonSchema)]
struct SiteCreatedRenamed {
    site_id: i64,
    tenant_id: i64,
    hostname: String,
}

/// Only the committed site.created, so the other types do not count as removed.
fn committed_site_created() -> (PathBuf, SchemaSet) {
    let dir = scratch("chom-committed-site-created");
    let name = schema_file_name(SITE_CREATED, 1);
    std::fs::copy(committed_dir().join(&name), dir.join(&name)).unwrap();
    let set = SchemaSet::read_dir(&dir).unwrap();
    (dir, set)
}

#[test]
fn a_breaking_change_is_refused_and_the_same_change_with_a_version_bump_and_upcaster_accepted() {
    let (dir, committed) = committed_site_created();

    let same_version = Registry::new()
        .event_schema::<SiteCreatedRenamed>(SITE_CREATED, 1)
        .unwrap();
    let refused = compat::check(&same_version.schema_set(), &committed);
    assert_eq!(refused.breaking(), vec![SITE_CREATED], "{refused}");
    let text = refused.to_string();
    assert!(
        text.contains("site.created: BREAKING: breaking change at v1"),
        "{text}"
    );
    assert!(text.contains("/domain: field removed"), "{text}");
    assert!(text.contains("/hostname: new required field"), "{text}");

    let bumped_without_upcaster = Registry::new()
        .event_schema::<SiteCreatedRenamed>(SITE_CREATED, 2)
        .unwrap();
    let refused = compat::check(&bumped_without_upcaster.schema_set(), &committed);
    assert!(!refused.is_compatible());
    assert!(
        refused.to_string().contains("without an upcaster for v1 -> v2"),
        "{refused}"
    );

    let bumped = Registry::new()
        .event_schema::<SiteCreatedRenamed>(SITE_CREATED, 2)
        .unwrap()
        .upcaster(SITE_CREATED, 1, |mut v| {
            let domain = v["domain"].take();
            v["hostname"] = domain;
            Ok(v)
        })
        .unwrap();
    let accepted = compat::check(&bumped.schema_set(), &committed);
    assert!(accepted.is_compatible(), "{accepted}");
    assert_eq!(
        accepted.verdict(SITE_CREATED),
        Some(&Verdict::VersionRaised { from: 1, to: 2 })
    );

    // Exported, the v2 file carries its upcaster: the folder alone (what
    // `outbox schema check --current` reads) gives the same verdict.
    let exported = scratch("chom-exported-site-created");
    bumped.schema_set().export(&exported, None).unwrap();
    let from_folder = compat::check(&SchemaSet::read_dir(&exported).unwrap(), &committed);
    assert_eq!(
        from_folder.verdict(SITE_CREATED),
        Some(&Verdict::VersionRaised { from: 1, to: 2 })
    );
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::remove_dir_all(&exported).unwrap();
}

#[test]
fn chom_schema_check_fails_on_a_breaking_change_with_a_line_per_type() {
    // A committed set whose site.created has a field the code no longer
    // has: the current code removed it.
    let dir = scratch("chom-committed-edited");
    for entry in std::fs::read_dir(committed_dir()).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
    }
    let file = dir.join(schema_file_name(SITE_CREATED, 1));
    let mut schema: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    schema["properties"]["plan"] = serde_json::json!({"type": "string"});
    schema["required"].as_array_mut().unwrap().push("plan".into());
    std::fs::write(&file, serde_json::to_string_pretty(&schema).unwrap()).unwrap();

    let out = Command::new(env!("CARGO_BIN_EXE_chom"))
        .args(["schema", "check", "--against"])
        .arg(&dir)
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(stdout.contains("site.created: BREAKING"), "{stdout}");
    assert!(stdout.contains("  /plan: field removed"), "{stdout}");
    assert!(stdout.contains("site.deleted: unchanged (v1)"), "{stdout}");
    assert!(
        stderr.contains("breaking change in site.created against"),
        "{stderr}"
    );

    let ok = Command::new(env!("CARGO_BIN_EXE_chom"))
        .args(["schema", "check", "--against"])
        .arg(committed_dir())
        .output()
        .unwrap();
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn chom_schema_export_writes_the_committed_files() {
    let dir = scratch("chom-export");
    let out = Command::new(env!("CARGO_BIN_EXE_chom"))
        .args(["schema", "export"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("19 schema(s) written to {}", dir.display())
    );
    for event_type in EVENT_TYPES {
        let name = schema_file_name(event_type, 1);
        assert_eq!(
            std::fs::read_to_string(dir.join(&name)).unwrap(),
            std::fs::read_to_string(committed_dir().join(&name)).unwrap(),
            "{name}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A site.created whose payload does not fit the schema: `site_id` a string.
#[derive(Serialize)]
struct WrongSiteCreated {
    site_id: String,
    tenant_id: i64,
    domain: String,
}

impl DomainEvent for WrongSiteCreated {
    fn event_type(&self) -> &'static str {
        SITE_CREATED
    }
    fn aggregate_type(&self) -> &'static str {
        "site"
    }
    fn aggregate_id(&self) -> String {
        self.site_id.clone()
    }
}

#[test]
fn a_fake_outbox_refuses_a_payload_that_does_not_match_its_schema() {
    let (outbox, fake) = Outbox::fake_with(registry(&ListenerConfig::default()).unwrap());
    let wrong = WrongSiteCreated {
        site_id: "7".into(),
        tenant_id: 1,
        domain: "a.test".into(),
    };
    match outbox.envelope(&wrong, &Metadata::system()) {
        Err(outbox::Error::SchemaViolation {
            event_type,
            schema_version,
            path,
            reason,
        }) => {
            assert_eq!(
                (event_type.as_str(), schema_version, path.as_str()),
                (SITE_CREATED, 1, "/site_id")
            );
            assert!(reason.contains("integer"), "{reason}");
        }
        other => panic!("expected a schema violation, got {other:?}"),
    }
    fake.assert_nothing_recorded();
}

/// Installs `@asyncapi/parser` (the committed package.json and
/// package-lock.json of tests/asyncapi) under target/ once, and returns
/// the folder holding validate.mjs. Fails with what npm said when it
/// cannot install: the test never skips.
fn asyncapi_parser() -> PathBuf {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/asyncapi");
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("asyncapi-parser");
    std::fs::create_dir_all(&dir).unwrap();
    let lock = std::fs::read(fixture.join("package-lock.json")).unwrap();
    let installed = dir.join("node_modules/@asyncapi/parser/package.json").exists()
        && std::fs::read(dir.join("package-lock.json")).ok().as_deref() == Some(lock.as_slice());
    for file in ["package.json", "package-lock.json", "validate.mjs"] {
        std::fs::copy(fixture.join(file), dir.join(file)).unwrap();
    }
    if !installed {
        let out = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--ignore-scripts"])
            .current_dir(&dir)
            .output()
            .unwrap_or_else(|e| panic!("cannot run npm (node 20 and npm are needed for this test): {e}"));
        assert!(
            out.status.success(),
            "npm ci of @asyncapi/parser failed in {} (is the npm registry reachable?):\n{}{}",
            dir.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    dir
}

#[test]
fn the_asyncapi_document_passes_the_official_parser() {
    let chom_registry = chom::work::registry(&chom::work::WorkConfig::default()).unwrap();
    let doc = document(&chom_registry, &AsyncApiOptions::new(chom::listeners::APP)).unwrap();
    for event_type in EVENT_TYPES {
        assert!(doc["channels"][event_type].is_object(), "{event_type}");
        assert_eq!(
            doc["components"]["messages"][event_type]["payload"]["schema"]["properties"]["dataschema"]["const"],
            format!("urn:outbox:schema:{event_type}:v1")
        );
    }
    for queue in [
        "chom.record_audit_log",
        "chom.record_audit_log.dead",
        "chom.send_notification",
    ] {
        assert!(doc["channels"][queue].is_object(), "{queue}");
    }

    let parser = asyncapi_parser();
    let file = parser.join(format!("chom-{}.json", uuid::Uuid::now_v7()));
    std::fs::write(&file, serde_json::to_string_pretty(&doc).unwrap()).unwrap();
    let out = Command::new("node")
        .arg("validate.mjs")
        .arg(&file)
        .current_dir(&parser)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    std::fs::remove_file(&file).unwrap();
    assert!(
        out.status.success(),
        "@asyncapi/parser refused the document:\n{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("valid AsyncAPI 3.0.0"), "{stdout}");

    // `chom asyncapi` prints the same document.
    let printed: serde_json::Value = serde_json::from_slice(&chom_stdout(&["asyncapi"])).unwrap();
    assert_eq!(printed["channels"], doc["channels"]);
    assert_eq!(printed["components"], doc["components"]);
}

#[test]
fn the_event_catalog_page_is_what_the_registry_generates() {
    let chom_registry = chom::work::registry(&chom::work::WorkConfig::default()).unwrap();
    let page = outbox::contract::catalog::markdown(&chom_registry, &chom::events::catalog_options());
    let committed =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/events.md")).unwrap();
    assert!(
        committed == page,
        "docs/events.md is not what the registry generates: run `cargo run -p chom -- schema catalog --out docs/events.md` and commit it"
    );
    for event_type in EVENT_TYPES {
        assert!(page.contains(&format!("\n## {event_type}\n")), "{event_type}");
    }
    assert!(
        page.contains(
            "- webhooks: endpoints can subscribe (`outbox webhooks add --event-type site.created`)"
        )
    );
    assert!(page.contains("`record_audit_log` (queued)"));
    assert!(page.contains("`record_metrics` (sync)"));
    for schema in chom_registry.schemas().iter() {
        let example = outbox::contract::catalog::example(schema.schema());
        schema.validate(&example).unwrap();
    }
    assert_eq!(
        String::from_utf8_lossy(&chom_stdout(&["schema", "catalog"])),
        page
    );
}
