//! Roles, the audit trail and sessions over real HTTP: what each role may
//! do, what the trail keeps and how it filters, and logins that outlive a
//! restart of the dashboard.

use anyhow::{Result, anyhow, ensure};
use outbox::testing::count;
use outbox_dashboard::Credentials;

use crate::support::{Dashboard, TestQueue, client, insert_failed, log_in_with, token_file};

const VIEWER_TOKEN: &str = "viewer-token-0123456789abcdef";
pub const OPERATOR_TOKEN: &str = "operator-token-0123456789abcdef";
const ADMIN_TOKEN: &str = "admin-token-0123456789abcdef";
const LEGACY_TOKEN: &str = "legacy-token-0123456789abcdef";

/// A token file with one token per role, and one of the old format (no
/// role).
pub fn role_tokens() -> Result<Credentials> {
    token_file(&format!(
        "role=viewer vera:{VIEWER_TOKEN}\nrole=operator olga:{OPERATOR_TOKEN}\n\
         role=admin ada:{ADMIN_TOKEN}\nbob:{LEGACY_TOKEN}\n"
    ))
}

async fn post(http: &reqwest::Client, url: String, form: &[(&str, &str)]) -> Result<(u16, String)> {
    let response = http.post(url).form(form).send().await?;
    let status = response.status().as_u16();
    Ok((status, response.text().await?))
}

fn refused(status: u16, page: &str, needed: &str, held: &str) -> Result<()> {
    ensure!(status == 403, "{status}: {page}");
    ensure!(
        page.contains(&format!("needs the {needed} role")) && page.contains(&format!("with the {held} role")),
        "the 403 names the roles: {page}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_may_do_what_it_allows_and_no_more() -> Result<()> {
    let db = outbox::TestDatabase::create()?;
    let dashboard = Dashboard::start_with(db, Some(role_tokens()?), |config| {
        config.bulk_admin_threshold = 2;
    })
    .await?;
    let queue = TestQueue::declare().await?;
    let mut conn = dashboard.db.connect()?;
    let mut jobs = Vec::new();
    for n in 0..8 {
        jobs.push(insert_failed(
            &mut conn,
            &queue.name,
            "record_audit_log",
            "site.created",
            &format!("boom {n}"),
            serde_json::json!({"n": n}),
        )?);
    }
    let url = |path: String| dashboard.url(&path);

    // A viewer reads, sees no action, and is refused every one.
    let viewer = client()?;
    let csrf = log_in_with(&dashboard, &viewer, "", VIEWER_TOKEN).await?;
    let page = viewer
        .get(url(format!("/failed/{}", jobs[0])))
        .send()
        .await?
        .text()
        .await?;
    ensure!(page.contains("vera") && page.contains("viewer"), "who is shown");
    ensure!(
        !page.contains("retry-job") && !page.contains("forget-job"),
        "no action for a viewer"
    );
    let (status, page) = post(
        &viewer,
        url(format!("/failed/{}/retry", jobs[0])),
        &[("csrf", &csrf)],
    )
    .await?;
    refused(status, &page, "operator", "viewer")?;
    let (status, page) = post(
        &viewer,
        url(format!("/failed/{}/forget", jobs[0])),
        &[("csrf", &csrf)],
    )
    .await?;
    refused(status, &page, "operator", "viewer")?;
    let (status, page) = post(&viewer, url("/pause".into()), &[("csrf", &csrf), ("reason", "x")]).await?;
    refused(status, &page, "operator", "viewer")?;
    let response = viewer
        .get(url(format!("/failed/{}/edit", jobs[0])))
        .send()
        .await?;
    ensure!(response.status() == 403);
    refused(403, &response.text().await?, "admin", "viewer")?;
    ensure!(
        count(&mut conn, "SELECT count(*) AS n FROM failed_jobs") == 8,
        "viewer changed nothing"
    );

    // An operator retries, forgets, pauses; not edit, not in bulk over
    // the threshold.
    let operator = client()?;
    let csrf = log_in_with(&dashboard, &operator, "", OPERATOR_TOKEN).await?;
    let page = operator
        .get(url(format!("/failed/{}", jobs[0])))
        .send()
        .await?
        .text()
        .await?;
    ensure!(
        page.contains("retry-job") && !page.contains("edit-job"),
        "an operator's actions"
    );
    let (status, _) = post(
        &operator,
        url(format!("/failed/{}/retry", jobs[0])),
        &[("csrf", &csrf)],
    )
    .await?;
    ensure!(status == 303, "operator retry: {status}");
    let (status, _) = post(
        &operator,
        url(format!("/failed/{}/forget", jobs[1])),
        &[("csrf", &csrf)],
    )
    .await?;
    ensure!(status == 303, "operator forget: {status}");
    let (status, _) = post(
        &operator,
        url("/pause".into()),
        &[("csrf", &csrf), ("reason", "incident 7")],
    )
    .await?;
    ensure!(status == 303, "operator pause: {status}");
    let (status, _) = post(&operator, url("/resume".into()), &[("csrf", &csrf)]).await?;
    ensure!(status == 303, "operator resume: {status}");
    let two = [jobs[2].to_string(), jobs[3].to_string()];
    let (status, _) = post(
        &operator,
        url("/failed/forget".into()),
        &[("csrf", &csrf), ("id", &two[0]), ("id", &two[1])],
    )
    .await?;
    ensure!(status == 303, "operator bulk at the threshold: {status}");
    let three = [jobs[4].to_string(), jobs[5].to_string(), jobs[6].to_string()];
    let (status, page) = post(
        &operator,
        url("/failed/retry".into()),
        &[
            ("csrf", &csrf),
            ("id", &three[0]),
            ("id", &three[1]),
            ("id", &three[2]),
        ],
    )
    .await?;
    refused(status, &page, "admin", "operator")?;
    let confirmation = operator
        .get(url("/failed/retry-matching".into()))
        .send()
        .await?
        .text()
        .await?;
    ensure!(
        confirmation.contains("role-needed") && !confirmation.contains("confirm-retry-matching"),
        "the confirmation tells an operator the bulk needs admin"
    );
    let response = operator
        .get(url(format!("/failed/{}/edit", jobs[4])))
        .send()
        .await?;
    refused(
        response.status().as_u16(),
        &response.text().await?,
        "admin",
        "operator",
    )?;
    let (status, page) = post(
        &operator,
        url(format!("/failed/{}/edit", jobs[4])),
        &[("csrf", &csrf), ("payload", "{}")],
    )
    .await?;
    refused(status, &page, "admin", "operator")?;
    ensure!(
        count(&mut conn, "SELECT count(*) AS n FROM failed_jobs") == 4,
        "1 retried, 3 forgotten"
    );

    // An admin acts in bulk over the threshold.
    let admin = client()?;
    let csrf = log_in_with(&dashboard, &admin, "", ADMIN_TOKEN).await?;
    let (status, _) = post(
        &admin,
        url("/failed/retry".into()),
        &[
            ("csrf", &csrf),
            ("id", &three[0]),
            ("id", &three[1]),
            ("id", &three[2]),
        ],
    )
    .await?;
    ensure!(status == 303, "admin bulk: {status}");
    ensure!(count(&mut conn, "SELECT count(*) AS n FROM failed_jobs") == 1);

    // A token of the old format (no role) keeps every right: admin.
    let legacy = client()?;
    log_in_with(&dashboard, &legacy, "", LEGACY_TOKEN).await?;
    let response = legacy
        .get(url(format!("/failed/{}/edit", jobs[7])))
        .send()
        .await?;
    ensure!(
        response.status() == 200,
        "legacy edit form: {}",
        response.status()
    );
    ensure!(queue.depth().await? == 4, "4 retried messages on the queue");
    dashboard.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_trail_keeps_who_did_what_and_filters() -> Result<()> {
    let db = outbox::TestDatabase::create()?;
    let dashboard = Dashboard::start_with(db, Some(role_tokens()?), |_| {}).await?;
    let queue = TestQueue::declare().await?;
    let mut conn = dashboard.db.connect()?;
    let insert = |conn: &mut diesel::PgConnection, n: i64| {
        insert_failed(
            conn,
            &queue.name,
            "record_audit_log",
            "site.created",
            &format!("boom {n}"),
            serde_json::json!({"n": n}),
        )
    };
    let (first, second, third) = (
        insert(&mut conn, 1)?,
        insert(&mut conn, 2)?,
        insert(&mut conn, 3)?,
    );
    // A row past the retention, pruned by the next write.
    diesel::RunQueryDsl::execute(
        diesel::sql_query(
            "INSERT INTO dashboard_audit (at, operator, role, action) VALUES (now() - interval '91 days', 'old', 'admin', 'retry')",
        ),
        &mut conn,
    )?;

    let olga = client()?;
    let csrf = log_in_with(&dashboard, &olga, "", OPERATOR_TOKEN).await?;
    let (status, _) = post(
        &olga,
        dashboard.url(&format!("/failed/{first}/retry")),
        &[("csrf", &csrf)],
    )
    .await?;
    ensure!(status == 303);
    let (status, _) = post(
        &olga,
        dashboard.url("/pause"),
        &[("csrf", &csrf), ("reason", "incident 9")],
    )
    .await?;
    ensure!(status == 303);
    let ada = client()?;
    let csrf = log_in_with(&dashboard, &ada, "", ADMIN_TOKEN).await?;
    let edit_form = ada
        .get(dashboard.url(&format!("/failed/{second}/edit")))
        .send()
        .await?
        .text()
        .await?;
    ensure!(edit_form.contains("payload-editor"));
    let job = outbox::failed_jobs::get(&mut conn, second)?.ok_or_else(|| anyhow!("job {second}"))?;
    let mut edited = job.payload.clone();
    edited["data"] = serde_json::json!({"n": 22});
    let (status, page) = post(
        &ada,
        dashboard.url(&format!("/failed/{second}/edit")),
        &[("csrf", &csrf), ("payload", &edited.to_string())],
    )
    .await?;
    ensure!(status == 303, "edit: {status} {page}");
    let (status, _) = post(
        &ada,
        dashboard.url("/failed/retry-matching"),
        &[
            ("csrf", &csrf),
            ("expected", "1"),
            ("listener", "record_audit_log"),
        ],
    )
    .await?;
    ensure!(status == 303, "retry matching");
    ensure!(
        count(&mut conn, "SELECT count(*) AS n FROM failed_jobs") == 0,
        "{third} retried too"
    );

    ensure!(
        count(
            &mut conn,
            "SELECT count(*) AS n FROM dashboard_audit WHERE operator = 'old'"
        ) == 0,
        "rows past the retention are pruned on write"
    );
    ensure!(
        count(
            &mut conn,
            &format!(
                "SELECT count(*) AS n FROM dashboard_audit WHERE operator = 'olga' AND role = 'operator' \
                 AND action = 'retry' AND failed_job_id = {first} AND count = 1"
            )
        ) == 1,
        "olga's retry"
    );
    ensure!(
        count(
            &mut conn,
            &format!(
                "SELECT count(*) AS n FROM dashboard_audit WHERE operator = 'ada' AND action = 'edit_and_retry' \
                 AND failed_job_id = {second} AND before -> 'data' = '{{\"n\": 2}}' AND after -> 'data' = '{{\"n\": 22}}'"
            )
        ) == 1,
        "the edit keeps before and after"
    );
    ensure!(
        count(
            &mut conn,
            "SELECT count(*) AS n FROM dashboard_audit WHERE action = 'retry_matching' \
             AND selection = 'listener=record_audit_log' AND count = 1"
        ) == 1,
        "the selection and its count"
    );
    ensure!(
        count(
            &mut conn,
            "SELECT count(*) AS n FROM dashboard_audit WHERE detail = 'incident 9' AND action = 'pause'"
        ) == 1
    );
    ensure!(
        count(
            &mut conn,
            "SELECT count(*) AS n FROM dashboard_audit WHERE concat_ws(' ', operator, selection, detail, before, after) LIKE '%-token-%'"
        ) == 0,
        "no token in the trail"
    );

    // The page, filtered. Anyone who may read pages reads it.
    let reader = client()?;
    let page = reader.get(dashboard.url("/audit")).send().await?.text().await?;
    for needle in [
        "olga",
        "ada",
        "edit_and_retry",
        "retry_matching",
        "incident 9",
        "log_in",
    ] {
        ensure!(page.contains(needle), "/audit shows {needle}");
    }
    let page = reader
        .get(dashboard.url("/audit?operator=olga"))
        .send()
        .await?
        .text()
        .await?;
    ensure!(
        page.contains("data-action=\"pause\"") && !page.contains("edit_and_retry</code>"),
        "{page}"
    );
    let page = reader
        .get(dashboard.url("/audit?action=edit_and_retry"))
        .send()
        .await?
        .text()
        .await?;
    ensure!(
        page.matches("data-audit=").count() == 1 && page.contains(&format!("failed job {second}")),
        "{page}"
    );
    let page = reader
        .get(dashboard.url("/audit?until=1h"))
        .send()
        .await?
        .text()
        .await?;
    ensure!(page.contains("no-audit-rows"), "nothing older than an hour");
    let page = reader
        .get(dashboard.url("/audit?since=1h&action=pause"))
        .send()
        .await?
        .text()
        .await?;
    ensure!(page.matches("data-audit=").count() == 1);
    let response = reader.get(dashboard.url("/audit?since=whenever")).send().await?;
    ensure!(response.status() == 400);

    // Pages of 50, newest first.
    diesel::RunQueryDsl::execute(
        diesel::sql_query(
            "INSERT INTO dashboard_audit (operator, role, action, detail) \
             SELECT 'bulk', 'operator', 'forget', 'row ' || n FROM generate_series(1, 60) AS n",
        ),
        &mut conn,
    )?;
    let page = reader
        .get(dashboard.url("/audit?operator=bulk"))
        .send()
        .await?
        .text()
        .await?;
    ensure!(
        page.matches("data-audit=").count() == 50 && page.contains("row 60") && !page.contains("row 10<")
    );
    let next = crate::support::href_of(&page, "next-page").ok_or_else(|| anyhow!("no next page"))?;
    let page = reader.get(dashboard.url(&next)).send().await?.text().await?;
    ensure!(
        page.matches("data-audit=").count() == 10 && page.contains("row 10<") && !page.contains("next-page")
    );
    dashboard.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_survive_a_restart_and_end_at_logout_or_expiry() -> Result<()> {
    let db = outbox::TestDatabase::create()?;
    let dashboard = Dashboard::start_with(db, Some(role_tokens()?), |_| {}).await?;
    let mut conn = dashboard.db.connect()?;
    let http = client()?;
    let (csrf, session) = crate::support::log_in_session(&dashboard, &http, "", OPERATOR_TOKEN).await?;
    ensure!(
        count(&mut conn, "SELECT count(*) AS n FROM dashboard_sessions") == 1,
        "one session row"
    );
    ensure!(
        count(
            &mut conn,
            &format!(
                "SELECT count(*) AS n FROM dashboard_sessions WHERE id_sha256 = sha256('{session}'::bytea) \
                 AND operator = 'olga' AND role = 'operator' AND csrf <> '{session}'"
            )
        ) == 1,
        "the row keys the session by its SHA-256 only"
    );
    ensure!(
        count(
            &mut conn,
            &format!(
                "SELECT count(*) AS n FROM dashboard_sessions WHERE encode(id_sha256, 'escape') LIKE '%{session}%'"
            )
        ) == 0
    );

    // A restart on the same database keeps the login.
    let dashboard = dashboard.restart().await?;
    let page = http.get(dashboard.url("/")).send().await?.text().await?;
    ensure!(page.contains("olga"), "still logged in after a restart");
    let (status, _) = post(&http, dashboard.url("/resume"), &[("csrf", &csrf)]).await?;
    ensure!(status == 303, "an action after the restart: {status}");

    // Logout deletes the row; the cookie is dead even if replayed.
    let (status, _) = post(&http, dashboard.url("/logout"), &[("csrf", &csrf)]).await?;
    ensure!(status == 303);
    ensure!(count(&mut conn, "SELECT count(*) AS n FROM dashboard_sessions") == 0);
    let replayed = client()?
        .post(dashboard.url("/resume"))
        .header("cookie", format!("outbox_session={session}"))
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await?;
    ensure!(
        replayed.status() == 401,
        "a logged-out cookie: {}",
        replayed.status()
    );

    // An expired session is refused, and pruned at the next login.
    let csrf = log_in_with(&dashboard, &http, "", OPERATOR_TOKEN).await?;
    diesel::RunQueryDsl::execute(
        diesel::sql_query("UPDATE dashboard_sessions SET expires_at = now() - interval '1 second'"),
        &mut conn,
    )?;
    let (status, _) = post(&http, dashboard.url("/resume"), &[("csrf", &csrf)]).await?;
    ensure!(status == 401, "expired: {status}");
    let page = http.get(dashboard.url("/")).send().await?.text().await?;
    ensure!(
        !page.contains("olga"),
        "an expired session shows no one logged in"
    );
    log_in_with(&dashboard, &client()?, "", ADMIN_TOKEN).await?;
    ensure!(
        count(
            &mut conn,
            "SELECT count(*) AS n FROM dashboard_sessions WHERE expires_at <= now()"
        ) == 0,
        "expired sessions pruned"
    );
    ensure!(count(&mut conn, "SELECT count(*) AS n FROM dashboard_sessions") == 1);
    dashboard.stop().await
}
