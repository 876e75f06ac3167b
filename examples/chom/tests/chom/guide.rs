//! `docs/adding-an-event.md` stays true: every Rust block in it is an
//! excerpt of the file it names (compiled, since it is the code itself),
//! and its step 5 is the test below.

use std::sync::Arc;

use chom::listeners::{DatabaseNotifier, SendNotification};
use chom::services::{sites, ssl};
use chrono::{Duration, Utc};
use outbox::{Metadata, Outbox};

use crate::support::{
    assert_envelope, assert_rolled_back, count, events_of, failing_metadata, received, run_in_inbox, setup,
    tenant_with_user,
};

#[test]
fn the_guides_event_is_recorded_once_and_notified() {
    let (_db, mut conn) = setup();
    let outbox = Outbox::new();
    let (tenant, _) = tenant_with_user(&mut conn, "Acme");
    let site = sites::create_site(&outbox, &mut conn, Metadata::system(), tenant.id, "a.test").unwrap();
    let requested = ssl::request_certificate(&outbox, &mut conn, Metadata::system(), site.value.id).unwrap();
    let expires_at = Utc::now() + Duration::days(5);
    ssl::issue_certificate(
        &outbox,
        &mut conn,
        Metadata::system(),
        requested.value.id,
        "CA",
        expires_at,
    )
    .unwrap();

    // Rolled back: the event could not be recorded, so no warning either.
    assert_rolled_back(ssl::check_expiring(&outbox, &mut conn, failing_metadata(), 7));
    assert!(events_of(&mut conn, "ssl.certificate_expiring").is_empty());

    let warned = ssl::check_expiring(&outbox, &mut conn, Metadata::system(), 7).unwrap();
    let rows = events_of(&mut conn, "ssl.certificate_expiring");
    assert_eq!(rows.len(), 1);
    let id = requested.value.id;
    assert_envelope(
        &rows[0],
        warned[0].event_id,
        "ssl.certificate_expiring",
        "ssl_certificate",
        id,
        tenant.id,
        None,
    );
    assert_eq!(rows[0].payload["window_days"], 7);
    assert!(
        ssl::check_expiring(&outbox, &mut conn, Metadata::system(), 7)
            .unwrap()
            .is_empty(),
        "once"
    );

    let notify = SendNotification::new(Arc::new(DatabaseNotifier));
    let event = received(&mut conn, warned[0].event_id);
    assert!(run_in_inbox(&mut conn, &notify, &event).unwrap());
    assert_eq!(count(&mut conn, "SELECT count(*) AS n FROM notifications"), 1);
}

/// The guide, from the workspace root.
const GUIDE: &str = include_str!("../../../../docs/adding-an-event.md");

/// The guide's Rust blocks, each with the path of the last `.rs` file
/// linked before it.
fn excerpts() -> Vec<(String, Vec<String>)> {
    let mut found = Vec::new();
    let mut path = None;
    let mut block: Option<Vec<String>> = None;
    for line in GUIDE.lines() {
        if let Some(lines) = block.as_mut() {
            if line.trim() == "```" {
                let lines = block.take().unwrap_or_default();
                found.push((path.clone().expect("a file linked before the block"), lines));
            } else {
                lines.push(line.to_owned());
            }
        } else if line.trim() == "```rust" {
            block = Some(Vec::new());
        } else if let Some(start) = line.find("](../") {
            let rest = &line[start + 5..];
            if let Some(end) = rest.find(')')
                && rest[..end].ends_with(".rs")
            {
                path = Some(rest[..end].to_owned());
            }
        }
    }
    assert!(block.is_none(), "an unclosed code block in the guide");
    found
}

/// Non-empty lines, trimmed.
fn significant(lines: &[&str]) -> Vec<String> {
    lines
        .iter()
        .map(|l| l.trim().to_owned())
        .filter(|l| !l.is_empty())
        .collect()
}

#[test]
fn every_rust_block_of_the_guide_is_in_the_file_it_names() {
    let excerpts = excerpts();
    assert!(excerpts.len() >= 6, "the guide's six steps: {excerpts:?}");
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    for (path, lines) in excerpts {
        let source = std::fs::read_to_string(root.join(&path)).unwrap_or_else(|e| panic!("{path}: {e}"));
        let source = significant(&source.lines().collect::<Vec<_>>());
        // `// ...` splits a block into pieces found in order.
        let mut from = 0;
        let block: Vec<&str> = lines.iter().map(String::as_str).collect();
        for piece in block.split(|l| l.trim() == "// ...") {
            let piece = significant(piece);
            if piece.is_empty() {
                continue;
            }
            let at = (from..=source.len().saturating_sub(piece.len()))
                .find(|&i| source[i..i + piece.len()] == piece[..])
                .unwrap_or_else(|| panic!("not in {path} (in this order):\n{}", piece.join("\n")));
            from = at + piece.len();
        }
    }
}
