//! `outbox schema check`: two exported folders compared, CHOM's committed
//! schemas against what its code exports, then against a breaking edit of
//! it, refused, and the same edit with a version bump and its upcaster,
//! accepted.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::support::run_outbox;

fn committed() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/chom/schemas")
}

fn exported(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", uuid::Uuid::now_v7()));
    chom::listeners::registry(&chom::listeners::ListenerConfig::default())
        .unwrap()
        .schema_set()
        .export(&dir, None)
        .unwrap();
    dir
}

fn check(current: &Path) -> (i32, String, String) {
    let against = committed();
    run_outbox(
        &[
            "schema",
            "check",
            "--against",
            against.to_str().unwrap(),
            "--current",
            current.to_str().unwrap(),
        ],
        &[],
    )
}

#[test]
fn outbox_schema_check_passes_the_same_schemas_refuses_a_breaking_change_and_accepts_it_with_a_bump_and_upcaster()
 {
    let current = exported("outbox-schema-current");
    let (status, stdout, stderr) = check(&current);
    assert_eq!(status, 0, "{stdout}{stderr}");
    assert!(stdout.contains("site.created: unchanged (v1)"), "{stdout}");

    // site.created without `domain`, at the same version.
    let v1 = current.join("site.created.v1.schema.json");
    let mut schema: Value = serde_json::from_str(&std::fs::read_to_string(&v1).unwrap()).unwrap();
    schema["properties"].as_object_mut().unwrap().remove("domain");
    schema["required"] = json!(["site_id", "tenant_id"]);
    std::fs::write(&v1, serde_json::to_string_pretty(&schema).unwrap()).unwrap();
    let (status, stdout, stderr) = check(&current);
    assert_eq!(status, 1, "{stdout}{stderr}");
    assert!(
        stdout.starts_with("site.created: BREAKING: breaking change at v1"),
        "{stdout}"
    );
    assert!(stdout.contains("\n  /domain: field removed\n"), "{stdout}");
    assert!(stdout.contains("site.deleted: unchanged (v1)"), "{stdout}");
    assert!(
        stderr.contains("error: breaking change in site.created against"),
        "{stderr}"
    );

    // The same change as v2, without and then with an upcaster from v1.
    std::fs::remove_file(&v1).unwrap();
    schema["x-outbox-schema-version"] = json!(2);
    let v2 = current.join("site.created.v2.schema.json");
    std::fs::write(&v2, serde_json::to_string_pretty(&schema).unwrap()).unwrap();
    let (status, stdout, _) = check(&current);
    assert_eq!(status, 1, "{stdout}");
    assert!(stdout.contains("without an upcaster for v1 -> v2"), "{stdout}");
    schema["x-outbox-upcasters-from"] = json!([1]);
    std::fs::write(&v2, serde_json::to_string_pretty(&schema).unwrap()).unwrap();
    let (status, stdout, stderr) = check(&current);
    assert_eq!(status, 0, "{stdout}{stderr}");
    assert!(
        stdout.contains("site.created: version raised from v1 to v2, with upcasters"),
        "{stdout}"
    );
    std::fs::remove_dir_all(&current).unwrap();
}

#[test]
fn outbox_schema_check_names_a_folder_it_cannot_read() {
    let missing = Path::new(env!("CARGO_TARGET_TMPDIR")).join("no-such-schemas");
    let (status, _, stderr) = check(&missing);
    assert_eq!(status, 1, "{stderr}");
    assert!(stderr.contains("reading the current schemas in"), "{stderr}");
}
