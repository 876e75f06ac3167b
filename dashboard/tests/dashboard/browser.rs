//! End to end in a real headless Chromium (Debian's `chromium` and
//! `chromium-driver`, which `.ci/run` installs), driven over WebDriver:
//! after a CHOM run with a notifier outage, an operator logs in, finds the
//! failed notifications, edits and retries one, retries one as it is,
//! retries the rest by filter, pauses and resumes the relays, sees a
//! hostile payload as text, and follows one site's timeline. The test
//! saves screenshots of the main pages under `docs/dashboard/`.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use chom::listeners::ListenerConfig;
use fantoccini::{Client, ClientBuilder, Locator};
use outbox::TestDatabase;
use outbox::testing::count;
use tokio::process::{Child, Command};

use crate::access::{OPERATOR_TOKEN, role_tokens};
use crate::support::{Dashboard, TOKEN, TestQueue, insert_failed};

const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";

/// chromedriver on a free port; killed on drop.
struct Driver {
    child: Child,
    port: u16,
    profile: PathBuf,
}

impl Driver {
    async fn start() -> Result<Self> {
        for binary in [CHROMEDRIVER, CHROMIUM] {
            ensure!(
                std::path::Path::new(binary).exists(),
                "{binary} is missing: install Debian's chromium and chromium-driver (.ci/run does)"
            );
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start chromedriver")?;
        let profile = std::env::temp_dir().join(format!(
            "outbox-dashboard-chromium-{}",
            uuid::Uuid::now_v7().simple()
        ));
        let deadline = Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            ensure!(Instant::now() < deadline, "chromedriver did not open port {port}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Self { child, port, profile })
    }

    async fn browser(&self) -> Result<Client> {
        let mut capabilities = serde_json::Map::new();
        capabilities.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({
                "binary": CHROMIUM,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-quic", "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--window-size=1280,900",
                    format!("--user-data-dir={}", self.profile.display()),
                ],
            }),
        );
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        ClientBuilder::new(connector)
            .capabilities(capabilities)
            .connect(&format!("http://127.0.0.1:{}", self.port))
            .await
            .context("cannot open a Chromium session")
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// Waits until the element `css` exists and its text contains `needle`.
async fn wait_for_text(browser: &Client, css: &str, needle: &str) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(element) = browser.find(Locator::Css(css)).await
            && let Ok(text) = element.text().await
            && text.contains(needle)
        {
            return Ok(text);
        }
        if Instant::now() > deadline {
            let url = browser
                .current_url()
                .await
                .map(|u| u.to_string())
                .unwrap_or_default();
            bail!("{css} never contained {needle:?} (at {url})");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Reloads `path` until `css` contains `needle` (a worker is catching up).
async fn reload_until(browser: &Client, url: &str, css: &str, needle: &str, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        browser.goto(url).await?;
        if let Ok(element) = browser.find(Locator::Css(css)).await
            && element.text().await.is_ok_and(|t| t.contains(needle))
        {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "{url}: {css} never showed {needle:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn screenshot(browser: &Client, name: &str) -> Result<()> {
    let folder = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/dashboard");
    std::fs::create_dir_all(&folder)?;
    let png = browser.screenshot().await?;
    std::fs::write(folder.join(format!("{name}.png")), png)?;
    Ok(())
}

/// axe-core's `axe.min.js`, installed once by `npm ci` from the committed
/// package.json and package-lock.json of tests/axe into the target dir.
/// Fails with what npm said when it cannot install: the test never skips.
fn axe_source() -> Result<String> {
    let fixture = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/axe");
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard-axe");
    std::fs::create_dir_all(&dir)?;
    let lock = std::fs::read(fixture.join("package-lock.json"))?;
    let script = dir.join("node_modules/axe-core/axe.min.js");
    let installed = script.exists()
        && std::fs::read(dir.join("package-lock.json")).ok().as_deref() == Some(lock.as_slice());
    if !installed {
        for file in ["package.json", "package-lock.json"] {
            std::fs::copy(fixture.join(file), dir.join(file))?;
        }
        let out = std::process::Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--ignore-scripts"])
            .current_dir(&dir)
            .output()
            .context("cannot run npm (node and npm are needed for the accessibility check)")?;
        ensure!(
            out.status.success(),
            "npm ci of axe-core failed in {} (is the npm registry reachable?):\n{}{}",
            dir.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    std::fs::read_to_string(&script).with_context(|| format!("cannot read {}", script.display()))
}

/// Runs axe-core on the page `browser` shows and returns its serious and
/// critical violations, one line each (empty when none), plus any action
/// not reachable by keyboard (a click handler or a link without href).
/// axe.min.js goes in through WebDriver's script execution, which the
/// page's CSP (no inline script) does not govern in Chromium.
async fn accessibility_problems(browser: &Client, axe: &str) -> Result<Vec<String>> {
    browser.execute(axe, vec![]).await?;
    let found = browser
        .execute_async(
            r#"const done = arguments[arguments.length - 1];
            const keyboard = [...document.querySelectorAll('[onclick], a:not([href]), [tabindex^="-"], form')]
                .filter(e => e.tagName !== 'FORM' || !e.querySelector('button, input[type=submit]'))
                .map(e => 'not reachable by keyboard: ' + e.outerHTML.slice(0, 120));
            axe.run(document, { resultTypes: ['violations'] })
                .then(r => done(keyboard.concat(r.violations
                    .filter(v => v.impact === 'serious' || v.impact === 'critical')
                    .map(v => v.impact + ' ' + v.id + ' (' + v.help + '): '
                        + v.nodes.map(n => n.target.join(' ') + ' ' + (n.failureSummary || '').replace(/\s+/g, ' ')).join(' | ')))))
                .catch(e => done(['axe-core failed: ' + e]));"#,
            vec![],
        )
        .await?;
    Ok(serde_json::from_value(found)?)
}

/// Visits each of `paths` and fails listing every page's serious and
/// critical axe-core violations.
async fn check_accessibility(
    browser: &Client,
    dashboard: &Dashboard,
    axe: &str,
    paths: &[String],
) -> Result<()> {
    let mut problems = Vec::new();
    for path in paths {
        browser.goto(&dashboard.url(path)).await?;
        for problem in accessibility_problems(browser, axe).await? {
            problems.push(format!("{path}: {problem}"));
        }
    }
    ensure!(
        problems.is_empty(),
        "{} accessibility problems:\n{}",
        problems.len(),
        problems.join("\n")
    );
    Ok(())
}

fn failed_notifications(conn: &mut diesel::PgConnection) -> i64 {
    count(
        conn,
        "SELECT count(*) AS n FROM failed_jobs WHERE listener = 'send_notification'",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_fixes_a_notifier_outage_in_the_browser() -> Result<()> {
    let db = TestDatabase::create_empty()?;
    // The random tail of a v7 uuid: unique, and short in the screenshots.
    let id = uuid::Uuid::now_v7().simple().to_string();
    let id = &id[id.len() - 8..];
    let (exchange, app) = (format!("outbox_test.{id}"), format!("chom_{id}"));
    let listener_config = ListenerConfig {
        retries: Some(chom::demo::demo_retries()),
        ..ListenerConfig::default()
    };
    // What `chom work` declares: CHOM's listeners and the webhook ones.
    let registry = chom::work::registry(&chom::work::WorkConfig {
        listeners: listener_config.clone(),
        ..chom::work::WorkConfig::default()
    })?;
    let queues = outbox::consumer::topology::plan(&app, &registry)?;
    let names: Vec<String> = queues
        .iter()
        .flat_map(|q| q.all_queues())
        .map(str::to_owned)
        .collect();
    let cleanup = BrokerCleanup(names, vec![exchange.clone()]);

    // The CHOM run: normal traffic, then a notifier outage that outlasts
    // the retries, so notifications end as failed jobs.
    let report = chom::demo::run(
        chom::demo::DemoConfig {
            database_url: db.url().to_owned(),
            exchange: exchange.clone(),
            app: app.clone(),
            sites: 6,
            outage_sites: 6,
            ..chom::demo::DemoConfig::default()
        },
        |_| {},
    )
    .await?;
    ensure!(report.settled, "the CHOM run settled");
    let mut conn = db.connect()?;
    let failed_at_start = failed_notifications(&mut conn);
    ensure!(
        failed_at_start >= 3,
        "the outage left {failed_at_start} failed notifications"
    );
    let hostile = "<script>alert(1)</script><img src=x onerror=alert(2)>";
    let xss_job = insert_failed(
        &mut conn,
        "outbox_test.nowhere",
        "record_audit_log",
        "site.created",
        hostile,
        serde_json::json!({"domain": hostile}),
    )?;

    // A worker again, so retried jobs are handled (the notifier is back).
    let worker = chom::work::worker(&chom::work::WorkConfig {
        database_url: db.url().to_owned(),
        amqp_url: outbox::DEFAULT_AMQP_URL.into(),
        exchange: exchange.clone(),
        app: app.clone(),
        listeners: listener_config.clone(),
        shutdown_timeout: Duration::from_secs(10),
        ..chom::work::WorkConfig::default()
    })?;
    let (stop_worker, worker_stopped) = tokio::sync::watch::channel(false);
    let worker_task = tokio::spawn(async move {
        let mut stopped = worker_stopped;
        worker
            .run(async move {
                let _ = stopped.wait_for(|s| *s).await;
            })
            .await
    });

    // A relay too, so the overview shows one alive (it has nothing to
    // publish: the run's events are out).
    let relay = outbox::Relay::new(outbox::RelayConfig {
        database_url: db.url().to_owned(),
        exchange: exchange.clone(),
        relay_id: format!("relay-{id}"),
        ..outbox::RelayConfig::default()
    })?;
    let relay_task = tokio::spawn({
        let mut stopped = stop_worker.subscribe();
        async move {
            relay
                .run(async move {
                    let _ = stopped.wait_for(|s| *s).await;
                })
                .await
        }
    });

    let dashboard = Dashboard::start_on(db, true).await?;
    let driver = Driver::start().await?;
    let browser = driver.browser().await?;
    let outcome = drive(&browser, &dashboard, failed_at_start, xss_job).await;
    let _ = browser.close().await;
    let _ = stop_worker.send(true);
    worker_task.await??;
    relay_task.await??;
    dashboard.stop().await?;
    drop(cleanup);
    outcome
}

async fn drive(browser: &Client, dashboard: &Dashboard, failed_at_start: i64, xss_job: i64) -> Result<()> {
    let mut conn = dashboard.db.connect()?;
    let axe = axe_source()?;
    check_accessibility(browser, dashboard, &axe, &["/login".into()]).await?;
    // Log in.
    browser.goto(&dashboard.url("/login")).await?;
    browser
        .find(Locator::Css("input[name=operator]"))
        .await?
        .send_keys("dana")
        .await?;
    browser
        .find(Locator::Css("input[name=token]"))
        .await?
        .send_keys(TOKEN)
        .await?;
    browser
        .find(Locator::Css("form.login button"))
        .await?
        .click()
        .await?;
    wait_for_text(browser, "header .operator", "dana").await?;
    reload_until(
        browser,
        &dashboard.url("/"),
        "#relays",
        "alive",
        Duration::from_secs(20),
    )
    .await?;
    screenshot(browser, "overview").await?;
    browser.goto(&dashboard.url("/listeners")).await?;
    wait_for_text(browser, "#listeners", "send_notification").await?;
    screenshot(browser, "listeners").await?;

    // Find the failed notifications and open one.
    browser
        .goto(&dashboard.url("/failed?listener=send_notification"))
        .await?;
    let rows = browser.find_all(Locator::Css("#failed-jobs tbody tr")).await?;
    ensure!(rows.len() as i64 == failed_at_start, "{} rows listed", rows.len());
    screenshot(browser, "failed-jobs").await?;
    browser
        .find(Locator::Css("#failed-jobs tbody tr td a"))
        .await?
        .click()
        .await?;
    let event_id = wait_for_text(browser, "#event-id", "-").await?;
    let job_url = browser.current_url().await?.to_string();
    ensure!(
        wait_for_text(browser, "#exception", "notifier is down")
            .await
            .is_ok()
    );
    screenshot(browser, "failed-job").await?;

    // Retry it: the row goes, and its listener's effect appears in the
    // site's timeline.
    browser.find(Locator::Css("#retry-job")).await?.click().await?;
    wait_for_text(browser, "p.notice", "Retried failed job").await?;
    browser.goto(&job_url).await?;
    wait_for_text(browser, "p.error", "does not exist").await?;
    let timeline_url = format!(
        "{}?{}",
        dashboard.url("/events"),
        url::form_urlencoded::Serializer::new(String::new())
            .append_pair("q", event_id.trim())
            .finish()
    );
    browser.goto(&timeline_url).await?;
    browser
        .find(Locator::Css("#events tbody tr td a"))
        .await?
        .click()
        .await?;
    wait_for_text(browser, "#timeline", "send_notification").await?;
    let timeline = browser.current_url().await?.to_string();
    reload_until(
        browser,
        &timeline,
        "#timeline",
        "handled",
        Duration::from_secs(30),
    )
    .await?;
    let handled = count(
        &mut conn,
        &format!(
            "SELECT count(*) AS n FROM processed_events WHERE listener = 'send_notification' AND event_id = '{}'",
            event_id.trim()
        ),
    );
    ensure!(handled == 1, "the retried notification was handled");
    // The failure stays on the timeline with who retried it.
    wait_for_text(browser, "#timeline .retried", "retried by dana").await?;
    screenshot(browser, "timeline").await?;

    // Edit and retry another: the JSON is checked, both versions kept.
    browser
        .goto(&dashboard.url("/failed?listener=send_notification"))
        .await?;
    browser
        .find(Locator::Css("#failed-jobs tbody tr td a"))
        .await?
        .click()
        .await?;
    browser.find(Locator::Css("#edit-job")).await?.click().await?;
    let editor = browser.find(Locator::Css("#payload-editor")).await?;
    let original = editor
        .prop("value")
        .await?
        .ok_or_else(|| anyhow!("empty editor"))?;
    editor.clear().await?;
    editor.send_keys("{\"not\": json").await?;
    browser.find(Locator::Css("#submit-edit")).await?.click().await?;
    wait_for_text(browser, "#edit-problem", "not valid JSON").await?;
    let mut document: serde_json::Value = serde_json::from_str(&original)?;
    document["data"]["note"] = serde_json::json!("edited in the dashboard");
    let editor = browser.find(Locator::Css("#payload-editor")).await?;
    editor.clear().await?;
    editor.send_keys(&document.to_string()).await?;
    browser.find(Locator::Css("#submit-edit")).await?.click().await?;
    wait_for_text(browser, "p.notice", "edited payload").await?;
    ensure!(
        count(
            &mut conn,
            "SELECT count(*) AS n FROM failed_job_edits WHERE edited_by = 'dana' AND edited->'data'->>'note' = 'edited in the dashboard'"
        ) == 1
    );
    ensure!(failed_notifications(&mut conn) == failed_at_start - 2);

    // Retry everything the filter matches, after the confirmation.
    browser
        .goto(&dashboard.url("/failed?listener=send_notification"))
        .await?;
    browser
        .find(Locator::Css("div.actions a.button"))
        .await?
        .click()
        .await?;
    wait_for_text(browser, "#matching-count", &(failed_at_start - 2).to_string()).await?;
    browser
        .find(Locator::Css("#confirm-retry-matching"))
        .await?
        .click()
        .await?;
    wait_for_text(
        browser,
        "p.notice",
        &format!("Retried {} failed jobs", failed_at_start - 2),
    )
    .await?;
    ensure!(failed_notifications(&mut conn) == 0);
    outbox::testing::eventually("every notification handled after the retries", Duration::from_secs(30), || {
        count(&mut conn, "SELECT count(*) AS n FROM processed_events WHERE listener = 'send_notification'")
            >= count(
                &mut conn,
                "SELECT count(*) AS n FROM outbox_events WHERE event_type IN ('site.provisioning_failed', 'backup.failed')",
            )
    })
    .await;

    // Pause and resume, with a reason.
    browser.goto(&dashboard.url("/")).await?;
    browser
        .find(Locator::Css("#pause input[name=reason]"))
        .await?
        .send_keys("incident 42")
        .await?;
    browser
        .find(Locator::Css("#pause button.danger"))
        .await?
        .click()
        .await?;
    wait_for_text(browser, "#paused-state", "incident 42 (by dana)").await?;
    ensure!(outbox::control::is_paused(&mut conn)?);
    // Resume from the keyboard: the action is a real button in a form.
    browser
        .find(Locator::Css("#pause button"))
        .await?
        .send_keys(&fantoccini::key::Key::Enter.to_string())
        .await?;
    wait_for_text(browser, "#paused-state", "Running").await?;
    ensure!(!outbox::control::is_paused(&mut conn)?);

    // A hostile payload is shown as text: no script runs, no element made.
    browser
        .goto(&dashboard.url(&format!("/failed/{xss_job}")))
        .await?;
    let shown = wait_for_text(browser, "#payload", "<script>alert(1)</script>").await?;
    ensure!(shown.contains("onerror=alert(2)"));
    ensure!(
        browser.find_all(Locator::Css("script")).await?.is_empty(),
        "no script element"
    );
    ensure!(
        browser.find_all(Locator::Css("main img")).await?.is_empty(),
        "no img element"
    );
    ensure!(browser.get_alert_text().await.is_err(), "no alert opened");

    // axe-core on every page an admin sees (the roles test covers the
    // operator's refusal page).
    let timeline_path = timeline
        .find("/timeline")
        .map(|at| timeline[at..].to_owned())
        .ok_or_else(|| anyhow!("no timeline path in {timeline}"))?;
    check_accessibility(
        browser,
        dashboard,
        &axe,
        &[
            "/".into(),
            "/listeners".into(),
            "/failed".into(),
            format!("/failed/{xss_job}"),
            format!("/failed/{xss_job}/edit"),
            "/failed/groups".into(),
            "/failed/retry-matching?listener=record_audit_log".into(),
            "/failed/forget-matching?listener=record_audit_log".into(),
            format!("/events?q={}", event_id.trim()),
            "/events".into(),
            timeline_path,
            "/audit".into(),
            "/failed/999999999".into(),
        ],
    )
    .await?;
    Ok(())
}

/// Deletes the run's queues and exchange, also when the test fails.
struct BrokerCleanup(Vec<String>, Vec<String>);

impl Drop for BrokerCleanup {
    fn drop(&mut self) {
        outbox::testing::delete_broker_objects(outbox::DEFAULT_AMQP_URL, &self.0, &self.1);
    }
}

/// An operator (not an admin) in the browser: edit-and-retry is refused
/// with both roles named, an error group is retried behind its
/// confirmation, and the audit page shows and filters what was done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_meets_roles_error_groups_and_the_audit_trail_in_the_browser() -> Result<()> {
    let db = TestDatabase::create()?;
    let queue = TestQueue::declare().await?;
    let mut conn = db.connect()?;
    let mut jobs = Vec::new();
    for (n, error) in ["card 4242 declined for 'ann'", "card 1111 declined for 'ben'"]
        .iter()
        .enumerate()
    {
        jobs.push(insert_failed(
            &mut conn,
            &queue.name,
            "charge_card",
            "order.placed",
            error,
            serde_json::json!({"n": n}),
        )?);
    }
    let dashboard = Dashboard::start_with(db, Some(role_tokens()?), |_| {}).await?;
    let driver = Driver::start().await?;
    let browser = driver.browser().await?;
    let outcome = drive_roles(&browser, &dashboard, jobs[0]).await;
    let _ = browser.close().await;
    ensure!(
        outcome.is_err() || queue.depth().await? == 2,
        "both jobs of the group retried"
    );
    dashboard.stop().await?;
    outcome
}

async fn drive_roles(browser: &Client, dashboard: &Dashboard, job: i64) -> Result<()> {
    browser.goto(&dashboard.url("/login")).await?;
    ensure!(
        browser.find(Locator::Css("input[name=operator]")).await.is_err(),
        "personal tokens only: no name to type"
    );
    browser
        .find(Locator::Css("input[name=token]"))
        .await?
        .send_keys(OPERATOR_TOKEN)
        .await?;
    browser
        .find(Locator::Css("form.login button"))
        .await?
        .click()
        .await?;
    wait_for_text(browser, "header .operator", "olga").await?;
    wait_for_text(browser, "header #role", "operator").await?;

    // Edit-and-retry is an admin's: the page says so.
    browser.goto(&dashboard.url(&format!("/failed/{job}"))).await?;
    ensure!(
        browser.find(Locator::Css("#edit-job")).await.is_err(),
        "no edit link for an operator"
    );
    browser
        .goto(&dashboard.url(&format!("/failed/{job}/edit")))
        .await?;
    let refusal = wait_for_text(browser, "main", "403").await?;
    ensure!(
        refusal.contains("needs the admin role") && refusal.contains("with the operator role"),
        "{refusal}"
    );
    let axe = axe_source()?;
    check_accessibility(browser, dashboard, &axe, &[format!("/failed/{job}/edit")]).await?;

    // The two card errors are one group; retry it.
    browser.goto(&dashboard.url("/failed/groups")).await?;
    wait_for_text(browser, "#error-groups", "card N declined for ?").await?;
    browser.find(Locator::Css("a.retry-group")).await?.click().await?;
    wait_for_text(browser, "#matching-count", "2").await?;
    browser
        .find(Locator::Css("#confirm-retry-matching"))
        .await?
        .click()
        .await?;
    wait_for_text(browser, ".notice", "Retried 2 failed jobs").await?;

    // The audit page shows it, and filters by action.
    browser.goto(&dashboard.url("/audit")).await?;
    let trail = wait_for_text(browser, "#audit", "retry_matching").await?;
    ensure!(trail.contains("olga") && trail.contains("log_in"), "{trail}");
    let action = browser
        .find(Locator::Css("#audit-filters input[name=action]"))
        .await?;
    action.send_keys("log_in").await?;
    browser
        .find(Locator::Css("#audit-filters button[type=submit]"))
        .await?
        .click()
        .await?;
    wait_for_text(browser, "#audit", "log_in").await?;
    let filtered = browser.find(Locator::Css("#audit")).await?.text().await?;
    ensure!(
        !filtered.contains("retry_matching"),
        "filtered by action: {filtered}"
    );
    Ok(())
}
