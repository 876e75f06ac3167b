//! Every route and every refusal over real HTTP.

use anyhow::{Result, ensure};
use outbox::testing::count;

use crate::support::{Dashboard, TOKEN, TestQueue, client, hidden_value, insert_failed, log_in};

fn header<'a>(response: &'a reqwest::Response, name: &str) -> &'a str {
    response
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_page_answers_with_strict_headers_and_no_token() -> Result<()> {
    let dashboard = Dashboard::start(true).await?;
    let mut conn = dashboard.db.connect()?;
    let job = insert_failed(
        &mut conn,
        "nowhere",
        "record_audit_log",
        "site.created",
        "boom",
        serde_json::json!({}),
    )?;
    let http = client()?;
    for path in [
        "/".to_owned(),
        "/listeners".into(),
        "/failed".into(),
        format!("/failed/{job}"),
        format!("/failed/{job}/edit"),
        "/failed/retry-matching".into(),
        "/failed/forget-matching".into(),
        "/failed/groups".into(),
        "/audit".into(),
        "/events".into(),
        "/events?q=7".into(),
        "/timeline?aggregate_type=site&aggregate_id=7".into(),
        "/login".into(),
        "/no-such-page".into(),
    ] {
        let response = http.get(dashboard.url(&path)).send().await?;
        let status = response.status().as_u16();
        ensure!(
            status == 200 || (path == "/no-such-page" && status == 404),
            "{path}: {status}"
        );
        ensure!(
            header(&response, "content-security-policy").contains("default-src 'none'"),
            "{path}: CSP"
        );
        ensure!(
            !header(&response, "content-security-policy").contains("script-src"),
            "{path}: no script allowed"
        );
        ensure!(header(&response, "x-frame-options") == "DENY", "{path}: framing");
        ensure!(
            header(&response, "cache-control") == "no-store",
            "{path}: caching"
        );
        ensure!(header(&response, "x-content-type-options") == "nosniff", "{path}");
        let body = response.text().await?;
        ensure!(!body.contains(TOKEN), "{path} shows the token");
    }
    let css = http.get(dashboard.url("/assets/style.css")).send().await?;
    ensure!(header(&css, "content-type").starts_with("text/css"));
    dashboard.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_it_is_read_only_and_refuses_other_addresses() -> Result<()> {
    let dashboard = Dashboard::start(false).await?;
    let mut conn = dashboard.db.connect()?;
    let job = insert_failed(
        &mut conn,
        "nowhere",
        "l",
        "site.created",
        "boom",
        serde_json::json!({}),
    )?;
    let http = client()?;
    for path in [
        format!("/failed/{job}/retry"),
        format!("/failed/{job}/forget"),
        "/pause".into(),
        "/failed/retry".into(),
    ] {
        let response = http
            .post(dashboard.url(&path))
            .form(&[("csrf", "x"), ("id", &job.to_string())])
            .send()
            .await?;
        ensure!(response.status() == 403, "{path}: {}", response.status());
        ensure!(response.text().await?.contains("read-only"), "{path}: says why");
    }
    ensure!(http.get(dashboard.url("/login")).send().await?.status() == 403);
    let page = http
        .get(dashboard.url(&format!("/failed/{job}")))
        .send()
        .await?
        .text()
        .await?;
    ensure!(!page.contains("/retry\""), "no action buttons when read-only");
    ensure!(
        count(&mut conn, "SELECT count(*) AS n FROM failed_jobs") == 1,
        "nothing changed"
    );
    dashboard.stop().await?;

    // Anything but loopback needs credentials.
    let mut config =
        outbox_dashboard::DashboardConfig::new("postgres://postgres@127.0.0.1/x", outbox::DEFAULT_AMQP_URL);
    config.bind = "0.0.0.0:0".parse()?;
    let refused = outbox_dashboard::serve(config.clone(), async {}, |_| {}).await;
    let message = refused.err().map(|e| e.to_string()).unwrap_or_default();
    ensure!(
        message.contains("refusing to listen on 0.0.0.0:0 without authentication"),
        "{message}"
    );
    config.credentials = Some(outbox_dashboard::Credentials::shared(TOKEN)?);
    ensure!(config.validate().is_ok());
    ensure!(
        outbox_dashboard::Credentials::shared("short").is_err(),
        "short tokens refused"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_sessions_and_csrf_refuse_what_they_must() -> Result<()> {
    let dashboard = Dashboard::start(true).await?;
    let mut conn = dashboard.db.connect()?;
    let job = insert_failed(
        &mut conn,
        "nowhere",
        "l",
        "site.created",
        "boom",
        serde_json::json!({}),
    )?;
    let anonymous = client()?;
    // No session: 401.
    let response = anonymous
        .post(dashboard.url(&format!("/failed/{job}/forget")))
        .form(&[("csrf", "x")])
        .send()
        .await?;
    ensure!(response.status() == 401, "no session: {}", response.status());
    // Wrong token, and a login form without its cookie.
    let form = anonymous
        .get(dashboard.url("/login"))
        .send()
        .await?
        .text()
        .await?;
    let nonce = hidden_value(&form, "login_csrf").unwrap_or_default();
    let wrong = anonymous
        .post(dashboard.url("/login"))
        .form(&[
            ("login_csrf", nonce.as_str()),
            ("operator", "eve"),
            ("token", "test-token-0123456789abcdeX"),
        ])
        .send()
        .await?;
    ensure!(wrong.status() == 403, "wrong token: {}", wrong.status());
    ensure!(
        wrong
            .headers()
            .get("set-cookie")
            .is_none_or(|c| !c.to_str().unwrap_or("").contains("outbox_session"))
    );
    let stale = client()?
        .post(dashboard.url("/login"))
        .form(&[
            ("login_csrf", nonce.as_str()),
            ("operator", "eve"),
            ("token", TOKEN),
        ])
        .send()
        .await?;
    ensure!(
        stale.status() == 403,
        "login without its cookie: {}",
        stale.status()
    );
    let nameless = anonymous
        .post(dashboard.url("/login"))
        .form(&[("login_csrf", nonce.as_str()), ("operator", ""), ("token", TOKEN)])
        .send()
        .await?;
    ensure!(
        nameless.status() == 400,
        "a shared token needs a name: {}",
        nameless.status()
    );

    let http = client()?;
    let csrf = log_in(&dashboard, &http, "alice").await?;
    let path = format!("/failed/{job}/forget");
    for bad in ["", "0000", &csrf[..csrf.len() - 1]] {
        let response = http
            .post(dashboard.url(&path))
            .form(&[("csrf", bad)])
            .send()
            .await?;
        ensure!(response.status() == 403, "csrf {bad:?}: {}", response.status());
        ensure!(response.text().await?.contains("CSRF"));
    }
    ensure!(
        count(&mut conn, "SELECT count(*) AS n FROM failed_jobs") == 1,
        "refusals changed nothing"
    );
    let response = http
        .post(dashboard.url(&path))
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await?;
    ensure!(response.status() == 303, "forget: {}", response.status());
    ensure!(count(&mut conn, "SELECT count(*) AS n FROM failed_jobs") == 0);
    // Logged out, the session is gone.
    let response = http
        .post(dashboard.url("/logout"))
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await?;
    ensure!(response.status() == 303);
    let response = http
        .post(dashboard.url("/resume"))
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await?;
    ensure!(response.status() == 401, "after logout: {}", response.status());
    // The log names who did what, and holds no token (neither the right
    // one nor the wrong one tried).
    let logs = crate::support::logs();
    ensure!(
        logs.contains("operator=alice") && logs.contains("action=\"forget\""),
        "{logs}"
    );
    ensure!(logs.contains("login refused: wrong token"));
    ensure!(!logs.contains("0123456789abcde"), "a token in the log: {logs}");
    dashboard.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_a_400_that_says_why() -> Result<()> {
    let dashboard = Dashboard::start(true).await?;
    let http = client()?;
    for (path, says) in [
        ("/failed?since=yesterday-ish", "since:"),
        ("/failed?until=13h%20ago%20maybe", "until:"),
        (
            "/failed?since=2026-12-02T00:00&until=2026-12-01T00:00",
            "since must be before until",
        ),
        ("/failed?limit=0", "limit:"),
        ("/failed?limit=abc", "limit:"),
        ("/failed?after=garbage", "after:"),
        ("/failed/abc", "not a failed job id"),
        ("/failed/retry-matching?since=nope", "since:"),
        ("/timeline?aggregate_type=site", "aggregate_type and aggregate_id"),
    ] {
        let response = http.get(dashboard.url(path)).send().await?;
        ensure!(response.status() == 400, "{path}: {}", response.status());
        let body = response.text().await?;
        ensure!(body.contains(says), "{path}: {body}");
    }
    ensure!(http.get(dashboard.url("/failed/999999")).send().await?.status() == 404);
    let csrf = log_in(&dashboard, &http, "alice").await?;
    let response = http
        .post(dashboard.url("/failed/retry"))
        .form(&[("csrf", csrf.as_str()), ("id", "x")])
        .send()
        .await?;
    ensure!(response.status() == 400, "bad id: {}", response.status());
    let response = http
        .post(dashboard.url("/failed/retry"))
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await?;
    ensure!(
        response.status() == 400,
        "nothing selected: {}",
        response.status()
    );
    let response = http
        .post(dashboard.url("/pause"))
        .form(&[("csrf", csrf.as_str()), ("reason", " ")])
        .send()
        .await?;
    ensure!(
        response.status() == 400,
        "pause without a reason: {}",
        response.status()
    );
    dashboard.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_jobs_filter_page_and_retry_in_bulk() -> Result<()> {
    let dashboard = Dashboard::start(true).await?;
    let queue = TestQueue::declare().await?;
    let mut conn = dashboard.db.connect()?;
    let mut audit = Vec::new();
    for i in 0..120 {
        let (listener, error) = if i % 3 == 0 {
            ("send_notification", "notifier is down")
        } else {
            ("record_audit_log", "deadlock detected")
        };
        let id = insert_failed(
            &mut conn,
            &queue.name,
            listener,
            "site.created",
            &format!("{error} #{i}"),
            serde_json::json!({"i": i}),
        )?;
        if listener == "record_audit_log" {
            audit.push(id);
        }
    }
    let http = client()?;
    // Keyset pages of 50: every job once, newest first.
    let mut seen = Vec::new();
    let mut path = "/failed?limit=50".to_owned();
    loop {
        let page = http.get(dashboard.url(&path)).send().await?.text().await?;
        seen.extend(page.match_indices("data-job=\"").map(|(at, m)| {
            let rest = &page[at + m.len()..];
            rest[..rest.find('"').unwrap_or(0)].parse::<i64>().unwrap_or(0)
        }));
        let Some(at) = page.find("id=\"next-page\" href=\"") else {
            break;
        };
        let rest = &page[at + 21..];
        path = rest[..rest.find('"').unwrap_or(0)].replace("&amp;", "&");
    }
    ensure!(seen.len() == 120, "paged {} jobs", seen.len());
    let mut sorted = seen.clone();
    sorted.sort_unstable_by(|a, b| b.cmp(a));
    sorted.dedup();
    ensure!(sorted == seen, "newest first, each once");
    // Filters: listener, error text (case-insensitive), time range.
    let page = http
        .get(dashboard.url("/failed?listener=send_notification&limit=500"))
        .send()
        .await?
        .text()
        .await?;
    ensure!(page.matches("data-job=").count() == 40);
    let page = http
        .get(dashboard.url("/failed?error=NOTIFIER&limit=500"))
        .send()
        .await?
        .text()
        .await?;
    ensure!(page.matches("data-job=").count() == 40);
    let page = http
        .get(dashboard.url("/failed?error=%2350%25&limit=500"))
        .send()
        .await?
        .text()
        .await?;
    ensure!(page.matches("data-job=").count() == 0, "% is literal");
    let page = http
        .get(dashboard.url("/failed?since=2000-01-01T00:00&until=2000-01-02T00:00"))
        .send()
        .await?
        .text()
        .await?;
    ensure!(page.contains("no-failed-jobs"));

    let csrf = log_in(&dashboard, &http, "alice").await?;
    // Retry selected: two jobs.
    let two = [audit[0].to_string(), audit[1].to_string()];
    let response = http
        .post(dashboard.url("/failed/retry"))
        .form(&[("csrf", csrf.as_str()), ("id", &two[0]), ("id", &two[1])])
        .send()
        .await?;
    ensure!(response.status() == 303, "retry selected: {}", response.status());
    ensure!(queue.depth().await? == 2, "two republished");
    // Retry all matching, after the confirmation's count.
    let confirm = http
        .get(dashboard.url("/failed/retry-matching?error=notifier"))
        .send()
        .await?
        .text()
        .await?;
    ensure!(confirm.contains("<strong>40</strong>"), "{confirm}");
    let response = http
        .post(dashboard.url("/failed/retry-matching"))
        .form(&[("csrf", csrf.as_str()), ("error", "notifier"), ("expected", "40")])
        .send()
        .await?;
    ensure!(response.status() == 303, "retry matching: {}", response.status());
    ensure!(queue.depth().await? == 42);
    // A confirmation that counted fewer jobs than match now is refused.
    for _ in 0..2 {
        insert_failed(
            &mut conn,
            &queue.name,
            "send_notification",
            "site.created",
            "notifier is down again",
            serde_json::json!({}),
        )?;
    }
    let response = http
        .post(dashboard.url("/failed/retry-matching"))
        .form(&[("csrf", csrf.as_str()), ("error", "notifier"), ("expected", "1")])
        .send()
        .await?;
    ensure!(
        response.status() == 409,
        "stale confirmation: {}",
        response.status()
    );
    ensure!(response.text().await?.contains("1 more than the 1 you confirmed"));
    ensure!(queue.depth().await? == 42, "nothing retried");
    let response = http
        .post(dashboard.url("/failed/retry-matching"))
        .form(&[("csrf", csrf.as_str()), ("error", "notifier"), ("expected", "2")])
        .send()
        .await?;
    ensure!(response.status() == 303);
    ensure!(queue.depth().await? == 44);
    ensure!(count(&mut conn, "SELECT count(*) AS n FROM failed_jobs") == 78);
    ensure!(
        count(
            &mut conn,
            "SELECT count(*) AS n FROM failed_jobs WHERE exception ILIKE '%notifier%'"
        ) == 0
    );
    // Forget selected.
    let response = http
        .post(dashboard.url("/failed/forget"))
        .form(&[("csrf", csrf.as_str()), ("id", &audit[2].to_string())])
        .send()
        .await?;
    ensure!(response.status() == 303);
    ensure!(count(&mut conn, "SELECT count(*) AS n FROM failed_jobs") == 77);
    // A job whose queue is gone is kept, and the page says why.
    let orphan = insert_failed(
        &mut conn,
        "outbox_test.no_such_queue",
        "l",
        "site.created",
        "x",
        serde_json::json!({}),
    )?;
    let response = http
        .post(dashboard.url(&format!("/failed/{orphan}/retry")))
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await?;
    ensure!(
        response.status().is_client_error() || response.status().is_server_error(),
        "{}",
        response.status()
    );
    ensure!(response.text().await?.contains("does not exist"));
    ensure!(
        count(
            &mut conn,
            &format!("SELECT count(*) AS n FROM failed_jobs WHERE id = {orphan}")
        ) == 1
    );
    dashboard.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edit_and_retry_checks_the_json_and_keeps_both_versions() -> Result<()> {
    let dashboard = Dashboard::start(true).await?;
    let queue = TestQueue::declare().await?;
    let mut conn = dashboard.db.connect()?;
    let job = insert_failed(
        &mut conn,
        &queue.name,
        "send_notification",
        "site.created",
        "bad address",
        serde_json::json!({"email": "nobody@"}),
    )?;
    let http = client()?;
    let csrf = log_in(&dashboard, &http, "bob").await?;
    let path = format!("/failed/{job}/edit");
    let response = http
        .post(dashboard.url(&path))
        .form(&[("csrf", csrf.as_str()), ("payload", "{\"broken\": ")])
        .send()
        .await?;
    ensure!(response.status() == 400);
    let body = response.text().await?;
    ensure!(
        body.contains("not valid JSON") && body.contains("{&quot;broken&quot;: "),
        "the form again, with the text: {body}"
    );
    let stored: serde_json::Value = diesel::RunQueryDsl::get_result::<Payload>(
        diesel::sql_query(format!("SELECT payload FROM failed_jobs WHERE id = {job}")),
        &mut conn,
    )?
    .payload;
    let mut edited = stored.clone();
    edited["id"] = serde_json::json!("another-event");
    let response = http
        .post(dashboard.url(&path))
        .form(&[("csrf", csrf.as_str()), ("payload", &edited.to_string())])
        .send()
        .await?;
    ensure!(response.status() == 400 && response.text().await?.contains("must keep the event"));
    let mut edited = stored.clone();
    edited["data"]["email"] = serde_json::json!("ops@example.com");
    let response = http
        .post(dashboard.url(&path))
        .form(&[("csrf", csrf.as_str()), ("payload", &edited.to_string())])
        .send()
        .await?;
    ensure!(response.status() == 303, "edit and retry: {}", response.status());
    let bodies = queue.drain().await?;
    ensure!(
        bodies.len() == 1 && bodies[0]["data"]["email"] == "ops@example.com",
        "{bodies:?}"
    );
    ensure!(count(&mut conn, "SELECT count(*) AS n FROM failed_jobs") == 0);
    ensure!(
        count(
            &mut conn,
            "SELECT count(*) AS n FROM failed_job_edits WHERE edited_by = 'bob' AND original->'data'->>'email' = 'nobody@' AND edited->'data'->>'email' = 'ops@example.com'"
        ) == 1
    );
    dashboard.stop().await
}

#[derive(diesel::QueryableByName)]
struct Payload {
    #[diesel(sql_type = diesel::sql_types::Jsonb)]
    payload: serde_json::Value,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_resume_and_payloads_render_as_text() -> Result<()> {
    let dashboard = Dashboard::start(true).await?;
    let mut conn = dashboard.db.connect()?;
    let xss = "<script>alert(1)</script><img src=x onerror=alert(2)>";
    let job = insert_failed(
        &mut conn,
        "nowhere",
        "l",
        "site.created",
        xss,
        serde_json::json!({"name": xss}),
    )?;
    let http = client()?;
    let page = http
        .get(dashboard.url(&format!("/failed/{job}")))
        .send()
        .await?
        .text()
        .await?;
    ensure!(
        !page.contains("<script>") && !page.contains("<img src=x"),
        "user content is escaped"
    );
    ensure!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
    let list = http.get(dashboard.url("/failed")).send().await?.text().await?;
    ensure!(!list.contains("<script>") && !list.contains("<img src=x"));

    let csrf = log_in(&dashboard, &http, "carol").await?;
    let response = http
        .post(dashboard.url("/pause"))
        .form(&[("csrf", csrf.as_str()), ("reason", "incident 42")])
        .send()
        .await?;
    ensure!(response.status() == 303);
    let mut conn2 = dashboard.db.connect()?;
    ensure!(outbox::control::is_paused(&mut conn2)?);
    ensure!(outbox::control::paused_by(&mut conn2)?.as_deref() == Some("incident 42 (by carol)"));
    let overview = http.get(dashboard.url("/")).send().await?.text().await?;
    ensure!(overview.contains("incident 42 (by carol)"));
    let response = http
        .post(dashboard.url("/resume"))
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await?;
    ensure!(response.status() == 303);
    ensure!(!outbox::control::is_paused(&mut conn2)?);
    let response = http
        .post(dashboard.url("/relay-failed/retry"))
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await?;
    ensure!(response.status() == 303);
    dashboard.stop().await
}

/// The `href` of the first link whose class attribute is `class`
/// (entities decoded).
fn link_of_class(page: &str, class: &str) -> Option<String> {
    let marker = format!("class=\"{class}\" href=\"");
    let start = page.find(&marker)? + marker.len();
    let end = page[start..].find('"')? + start;
    Some(page[start..end].replace("&amp;", "&"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_differing_only_in_ids_form_one_group_retried_as_one() -> Result<()> {
    let dashboard = Dashboard::start(true).await?;
    let queue = TestQueue::declare().await?;
    let mut conn = dashboard.db.connect()?;
    let errors = [
        "order 41 failed for 'alice': payment 0191d4c2-7e3b-7c4a-9f1e-2b3c4d5e6f70 declined (ref 0x1f3a)",
        "order 1042 failed for 'bob': payment 0191d4c2-7e3b-7c4a-9f1e-2b3c4d5e6f71 declined (ref 0x2)",
        "order 7 failed for \"carol\": payment 0191D4C2-7E3B-7C4A-9F1E-2B3C4D5E6F72 declined (ref 99ab)",
    ];
    for (n, error) in errors.iter().enumerate() {
        insert_failed(
            &mut conn,
            &queue.name,
            "charge_card",
            "order.placed",
            error,
            serde_json::json!({"n": n}),
        )?;
    }
    insert_failed(
        &mut conn,
        &queue.name,
        "charge_card",
        "order.placed",
        "timeout after 30s",
        serde_json::json!({}),
    )?;
    insert_failed(
        &mut conn,
        "nowhere",
        "send_receipt",
        "order.placed",
        errors[0],
        serde_json::json!({}),
    )?;
    let http = client()?;
    let csrf = log_in(&dashboard, &http, "gina").await?;

    let page = http
        .get(dashboard.url("/failed/groups"))
        .send()
        .await?
        .text()
        .await?;
    ensure!(
        page.matches("class=\"error-group\"").count() == 3,
        "three groups: {page}"
    );
    let masked = "order N failed for ?: payment &lt;id&gt; declined (ref N)";
    ensure!(page.contains(masked), "the masked text: {page}");
    // Largest first: the group of three leads, with its count.
    let first = page.find("class=\"error-group\"").unwrap_or(0);
    ensure!(page[first..].contains("<td class=\"num count\">3</td>"), "{page}");
    let only_receipts = http
        .get(dashboard.url("/failed/groups?listener=send_receipt"))
        .send()
        .await?
        .text()
        .await?;
    ensure!(only_receipts.matches("class=\"error-group\"").count() == 1);

    // Retry the group behind the confirmation, which shows its count.
    let confirm =
        link_of_class(&page, "button retry-group").ok_or_else(|| anyhow::anyhow!("no retry link"))?;
    ensure!(
        confirm.starts_with("/failed/retry-matching?listener=charge_card&group="),
        "{confirm}"
    );
    let confirmation = http.get(dashboard.url(&confirm)).send().await?.text().await?;
    ensure!(confirmation.contains("<strong>3</strong>"), "{confirmation}");
    let group = hidden_value(&confirmation, "group").ok_or_else(|| anyhow::anyhow!("no group field"))?;
    let group = group
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"");
    let response = http
        .post(dashboard.url("/failed/retry-matching"))
        .form(&[
            ("csrf", csrf.as_str()),
            ("listener", "charge_card"),
            ("group", group.as_str()),
            ("expected", "3"),
        ])
        .send()
        .await?;
    ensure!(response.status() == 303, "retry group: {}", response.status());
    let bodies = queue.drain().await?;
    let order: Vec<i64> = bodies.iter().filter_map(|b| b["data"]["n"].as_i64()).collect();
    ensure!(
        order == [0, 1, 2],
        "all three retried, in their aggregate's order: {order:?}"
    );
    ensure!(
        count(
            &mut conn,
            "SELECT count(*) AS n FROM failed_jobs WHERE listener = 'charge_card'"
        ) == 1
    );
    ensure!(
        count(
            &mut conn,
            "SELECT count(*) AS n FROM dashboard_audit WHERE action = 'retry_matching' AND count = 3"
        ) == 1,
        "the group's retry is audited with its count"
    );

    // Forget the other listener's group the same way.
    let page = http
        .get(dashboard.url("/failed/groups?listener=send_receipt"))
        .send()
        .await?
        .text()
        .await?;
    let confirm = link_of_class(&page, "button danger forget-group")
        .ok_or_else(|| anyhow::anyhow!("no forget link"))?;
    let confirmation = http.get(dashboard.url(&confirm)).send().await?.text().await?;
    ensure!(confirmation.contains("<strong>1</strong>") && confirmation.contains("confirm-forget-matching"));
    let response = http
        .post(dashboard.url("/failed/forget-matching"))
        .form(&[
            ("csrf", csrf.as_str()),
            ("listener", "send_receipt"),
            ("group", group.as_str()),
            ("expected", "1"),
        ])
        .send()
        .await?;
    ensure!(response.status() == 303, "forget group: {}", response.status());
    ensure!(
        count(&mut conn, "SELECT count(*) AS n FROM failed_jobs") == 1,
        "only the timeout is left"
    );
    dashboard.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_search_has_a_trigram_index_where_pg_trgm_exists() -> Result<()> {
    let dashboard = Dashboard::start(false).await?;
    let mut conn = dashboard.db.connect()?;
    let available = count(
        &mut conn,
        "SELECT count(*) AS n FROM pg_available_extensions WHERE name = 'pg_trgm'",
    ) == 1;
    let indexed = count(
        &mut conn,
        "SELECT count(*) AS n FROM pg_indexes WHERE indexname = 'failed_jobs_exception_trgm'",
    ) == 1;
    ensure!(
        indexed == available,
        "pg_trgm available: {available}, index built: {indexed}"
    );
    insert_failed(
        &mut conn,
        "nowhere",
        "l",
        "t",
        "disk full on /var/lib",
        serde_json::json!({}),
    )?;
    let page = client()?
        .get(dashboard.url("/failed?error=DISK+FULL"))
        .send()
        .await?
        .text()
        .await?;
    ensure!(
        page.contains("disk full on /var/lib"),
        "the search still finds it"
    );
    dashboard.stop().await
}

/// The `<li data-listener="...">` of `listener` on a timeline page, up to
/// the next listener's.
fn listener_item<'a>(page: &'a str, listener: &str) -> &'a str {
    let marker = format!("data-listener=\"{listener}\"");
    let Some(at) = page.find(&marker) else {
        return "";
    };
    let rest = &page[at..];
    let end = rest[marker.len()..]
        .find("data-listener=")
        .map_or(rest.len(), |n| n + marker.len());
    &rest[..end]
}

/// Issue 30: a failure an operator retried stays on its event's timeline
/// (its failed tries, who retried it and when), and a listener registered
/// but with no worker consuming its queue reads "not running" rather than
/// "not handled yet" until a consumer appears.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeline_keeps_a_retried_failure_and_names_listeners_not_running() -> Result<()> {
    use diesel::RunQueryDsl;
    use outbox::failed_jobs::{AttemptError, NewFailedJob};

    let dashboard = Dashboard::start(true).await?;
    let queue = TestQueue::declare().await?;
    let mut conn = dashboard.db.connect()?;
    let aggregate = format!("story-{}", uuid::Uuid::now_v7().simple());
    let event_id = outbox::testing::record_ticks(&mut conn, &aggregate, 1..2)?[0];
    // Two listeners of counter.ticked registered by a worker that is gone:
    // `count_ticks`, whose job failed, and `idle_ticks`, still waiting.
    for listener in ["count_ticks", "idle_ticks"] {
        diesel::sql_query(
            "INSERT INTO outbox_listeners (app, listener, exchange, queue, retry_queues, dead_queue, \
             event_types, worker_id, registered_at, inbox) \
             VALUES ('story', $1, 'outbox_test.none', $2, '{}', $2 || '.dead', ARRAY['counter.ticked'], \
             'worker-gone', now(), true)",
        )
        .bind::<diesel::sql_types::Text, _>(listener)
        .bind::<diesel::sql_types::Text, _>(&queue.name)
        .execute(&mut conn)?;
    }
    let tries: Vec<AttemptError> = (1..=2)
        .map(|attempt| AttemptError {
            attempt,
            at: chrono::Utc::now(),
            error: format!("tick store refused try {attempt}"),
        })
        .collect();
    let payload = serde_json::json!({
        "specversion": "1.0", "id": event_id.to_string(), "type": "counter.ticked",
        "source": "/outbox/test", "subject": aggregate, "aggregatetype": "counter", "data": {"n": 1},
    });
    let (job, _) = outbox::failed_jobs::insert(
        &mut conn,
        &NewFailedJob {
            queue: &queue.name,
            listener: "count_ticks",
            event_id: Some(event_id),
            event_type: Some("counter.ticked"),
            payload: &payload,
            exception: "tick store refused try 2",
            attempts: 2,
            errors: &tries,
            uuid: None,
        },
    )?;
    let http = client()?;
    let timeline = dashboard.url(&format!(
        "/timeline?aggregate_type=counter&aggregate_id={aggregate}"
    ));
    let page = http.get(&timeline).send().await?.text().await?;
    ensure!(
        listener_item(&page, "count_ticks").contains(&format!("failed job {job}")),
        "the failure before the retry: {page}"
    );
    ensure!(
        listener_item(&page, "idle_ticks").contains("not running"),
        "no worker consumes the queue: {page}"
    );
    let listeners = http.get(dashboard.url("/listeners")).send().await?.text().await?;
    ensure!(
        listener_item(&listeners, "idle_ticks").contains("not running"),
        "the listeners page says so too: {listeners}"
    );

    // An operator retries it: the row is deleted, the story stays.
    let csrf = log_in(&dashboard, &http, "alice").await?;
    let response = http
        .post(dashboard.url(&format!("/failed/{job}/retry")))
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await?;
    ensure!(response.status() == 303, "retry: {}", response.status());
    ensure!(
        count(
            &mut conn,
            &format!("SELECT count(*) AS n FROM failed_jobs WHERE id = {job}")
        ) == 0,
        "the retry deleted the row"
    );
    let page = http.get(&timeline).send().await?.text().await?;
    let story = listener_item(&page, "count_ticks");
    ensure!(
        story.contains(&format!("data-failed-job=\"{job}\""))
            && story.contains("retried by <strong>alice</strong>")
            && story.contains("after 2 tries")
            && story.contains("tick store refused try 1")
            && story.contains("tick store refused try 2"),
        "the retried failure on the timeline: {story}"
    );
    ensure!(
        !listener_item(&page, "idle_ticks").contains("retried by"),
        "the retry is count_ticks' alone"
    );
    let audit = http.get(dashboard.url("/audit")).send().await?.text().await?;
    ensure!(audit.contains("the jobs as retried"), "{audit}");

    // A worker consumes the queue again: waiting, no longer "not running".
    let connection = outbox::amqp::connect(outbox::DEFAULT_AMQP_URL, "dashboard story test").await?;
    let channel = connection.create_channel().await?;
    let _consumer = channel
        .basic_consume(
            queue.name.as_str().into(),
            "story-consumer".into(),
            lapin::options::BasicConsumeOptions::default(),
            lapin::types::FieldTable::default(),
        )
        .await?;
    let page = http.get(&timeline).send().await?.text().await?;
    let idle = listener_item(&page, "idle_ticks");
    ensure!(
        idle.contains("not handled yet") && !idle.contains("not running"),
        "a consumer runs the queue: {idle}"
    );
    let listeners = http.get(dashboard.url("/listeners")).send().await?.text().await?;
    ensure!(
        listener_item(&listeners, "idle_ticks").contains("1 consumer"),
        "the listeners page counts the consumer: {listeners}"
    );
    let _ = connection.close(200, "done".into()).await;
    dashboard.stop().await?;
    Ok(())
}

/// Pages whose figures move reload themselves only once the viewer asked
/// (`?refresh=on`, linked from the page), and say how to stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_reload_themselves_only_when_asked() -> Result<()> {
    let dashboard = Dashboard::start(true).await?;
    let http = client()?;
    for path in ["/", "/listeners", "/timeline?aggregate_type=site&aggregate_id=7"] {
        let page = http.get(dashboard.url(path)).send().await?.text().await?;
        ensure!(!page.contains("http-equiv=\"refresh\""), "{path} reloads unasked");
        ensure!(page.contains("id=\"refresh-on\""), "{path} offers no reload");
        let on = if path.contains('?') {
            format!("{path}&refresh=on")
        } else {
            format!("{path}?refresh=on")
        };
        let page = http.get(dashboard.url(&on)).send().await?.text().await?;
        ensure!(
            page.contains("http-equiv=\"refresh\" content=\"60\""),
            "{on}: {page}"
        );
        ensure!(page.contains("id=\"refresh-off\""), "{on} has no way to stop");
    }
    let page = http.get(dashboard.url("/failed")).send().await?.text().await?;
    ensure!(!page.contains("refresh-on"), "a list to act on never reloads");
    dashboard.stop().await?;
    Ok(())
}
