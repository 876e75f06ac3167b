//! One failed job: its envelope, final error, every try with its time and
//! error, and earlier edits; actions retry, forget and edit-and-retry (the
//! payload edited as JSON, checked before anything is sent; the original
//! and the edit kept with who and when).

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use axum_extra::extract::Form;
use maud::{Markup, html};
use outbox::failed_jobs::FailedJob;
use serde::Deserialize;

use crate::audit::Entry;
use crate::auth::{CsrfForm, Operator, Viewer, audit};
use crate::error::{DashboardError, Result};
use crate::layout::{csrf_field, link, page, time};
use crate::role::Role;
use crate::state::AppState;

fn job_id(text: &str) -> Result<i64> {
    text.parse()
        .map_err(|_| DashboardError::BadRequest(format!("not a failed job id: {text:?}")))
}

async fn load(state: &AppState, id: i64) -> Result<FailedJob> {
    state
        .db(move |conn| outbox::failed_jobs::get(conn, id))
        .await?
        .ok_or_else(|| {
            DashboardError::NotFound(format!("failed job {id} does not exist (retried or forgotten?)"))
        })
}

fn pretty(value: &serde_json::Value) -> String {
    serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
}

/// `GET /failed/{id}`.
pub(crate) async fn show(
    State(state): State<Arc<AppState>>,
    viewer: Viewer,
    Path(id): Path<String>,
) -> Result<Response> {
    let id = job_id(&id)?;
    let job = load(&state, id).await?;
    let (uuid, event_id) = (job.uuid, job.event_id);
    let edits = state
        .db(move |conn| outbox::failed_jobs::edits_for(conn, uuid, event_id))
        .await?;
    let aggregate = (
        job.payload
            .get("aggregatetype")
            .and_then(serde_json::Value::as_str),
        job.payload.get("subject").and_then(serde_json::Value::as_str),
    );
    let body = html! {
        h1 { "Failed job " (job.id) }
        dl.facts {
            dt { "listener" } dd { code { (job.listener) } " on " code { (job.queue) } }
            dt { "event" } dd {
                (job.event_type.as_deref().unwrap_or("?")) " "
                @if let Some(event_id) = job.event_id { code #event-id { (event_id) } }
                @if let (Some(kind), Some(id)) = aggregate {
                    " · " a href=(link("/timeline", &[("aggregate_type", Some(kind)), ("aggregate_id", Some(id))])) { "timeline of " (kind) " " (id) }
                }
            }
            dt { "failed" } dd { (time(job.failed_at)) " after " (job.attempts) " tries" }
            dt { "final error" } dd { pre.error #exception { (job.exception) } }
        }
        (actions(&viewer, &job))
        h2 { "Tries" }
        @if job.errors.is_empty() { p.empty { "No try was recorded (failed at once)." } } @else {
            table #tries {
                thead { tr { th.num { "try" } th { "at" } th { "error" } } }
                tbody { @for e in &job.errors { tr { td.num { (e.attempt) } td { (time(e.at)) } td { pre.error { (e.error) } } } } }
            }
        }
        h2 { "Envelope" }
        pre.json #payload { (pretty(&job.payload)) }
        (edit_history(&edits))
    };
    // The payload is user content: no-store (every page) and escaped.
    Ok(page(&format!("Failed job {id}"), &viewer, None, body).into_response())
}

fn actions(viewer: &Viewer, job: &FailedJob) -> Markup {
    html! {
        @if let Some(operator) = viewer.may(Role::Operator) {
            div.actions {
                form.inline method="post" action=(format!("/failed/{}/retry", job.id)) {
                    (csrf_field(operator)) button type="submit" #retry-job { "Retry" }
                }
                @if viewer.may(Role::Admin).is_some() {
                    a.button href=(format!("/failed/{}/edit", job.id)) #edit-job { "Edit and retry…" }
                }
                form.inline method="post" action=(format!("/failed/{}/forget", job.id)) {
                    (csrf_field(operator)) button.danger type="submit" #forget-job { "Forget" }
                }
            }
        } @else if viewer.can_log_in {
            p { a href="/login" { "Log in" } " to retry, edit or forget this job." }
        }
    }
}

fn edit_history(edits: &[outbox::failed_jobs::FailedJobEdit]) -> Markup {
    html! {
        @if !edits.is_empty() {
            h2 { "Edits" }
            @for edit in edits {
                section.edit {
                    p { "Edited by " strong { (edit.edited_by) } " at " (time(edit.edited_at)) }
                    details { summary { "original" } pre.json { (pretty(&edit.original)) } }
                    details open { summary { "retried with" } pre.json { (pretty(&edit.edited)) } }
                }
            }
        }
    }
}

/// `POST /failed/{id}/retry`.
pub(crate) async fn retry(
    State(state): State<Arc<AppState>>,
    operator: Operator,
    Path(id): Path<String>,
    Form(form): Form<CsrfForm>,
) -> Result<Response> {
    operator.check_csrf(&form.csrf)?;
    let id = job_id(&id)?;
    let job = state.db(move |conn| outbox::failed_jobs::get(conn, id)).await?;
    audit(
        &state,
        &operator,
        Role::Operator,
        Entry::new("retry").job(id).retried(job.as_slice()),
    )
    .await?;
    let (_, channel) = state.broker().await?;
    let job = outbox::failed_jobs::retry(&state.pool, &channel, id, state.config.confirm_timeout).await?;
    let text = format!("Retried failed job {} ({}).", job.id, job.listener);
    Ok(Redirect::to(&link("/failed", &[("notice", Some(&text))])).into_response())
}

/// `POST /failed/{id}/forget`.
pub(crate) async fn forget(
    State(state): State<Arc<AppState>>,
    operator: Operator,
    Path(id): Path<String>,
    Form(form): Form<CsrfForm>,
) -> Result<Response> {
    operator.check_csrf(&form.csrf)?;
    let id = job_id(&id)?;
    audit(&state, &operator, Role::Operator, Entry::new("forget").job(id)).await?;
    let existed = state
        .db(move |conn| outbox::failed_jobs::forget(conn, id))
        .await?;
    if !existed {
        return Err(DashboardError::NotFound(format!(
            "failed job {id} does not exist"
        )));
    }
    let text = format!("Forgot failed job {id}.");
    Ok(Redirect::to(&link("/failed", &[("notice", Some(&text))])).into_response())
}

/// `GET /failed/{id}/edit`.
pub(crate) async fn edit_form(
    State(state): State<Arc<AppState>>,
    viewer: Viewer,
    Path(id): Path<String>,
) -> Result<Response> {
    let id = job_id(&id)?;
    if let Some(operator) = &viewer.operator {
        operator.require(Role::Admin, "edit and retry")?;
    }
    let job = load(&state, id).await?;
    let text = pretty(&job.payload);
    Ok(edit_page(&viewer, &job, &text, None).into_response())
}

fn edit_page(viewer: &Viewer, job: &FailedJob, text: &str, problem: Option<&str>) -> Markup {
    page(
        &format!("Edit failed job {}", job.id),
        viewer,
        None,
        html! {
            h1 { "Edit and retry failed job " (job.id) }
            p { "The listener " code { (job.listener) } " gets the edited document instead of the stored one. Keep the event's "
                code { "id" } ", " code { "type" } ", " code { "source" } " and " code { "specversion" } "; edit its " code { "data" } "." }
            @if let Some(problem) = problem { p.error #edit-problem role="alert" { (problem) } }
            @if let Some(operator) = &viewer.operator {
                form.edit method="post" action=(format!("/failed/{}/edit", job.id)) {
                    (csrf_field(operator))
                    label for="payload-editor" { "The CloudEvents document to retry with (JSON)" }
                    textarea #payload-editor name="payload" rows="24" spellcheck="false" { (text) }
                    div.actions {
                        button type="submit" #submit-edit { "Retry with this payload" }
                        a href=(format!("/failed/{}", job.id)) { "Cancel" }
                    }
                }
            } @else {
                p { a href="/login" { "Log in" } " to edit this job." }
                pre.json { (text) }
            }
        },
    )
}

#[derive(Debug, Deserialize)]
pub(crate) struct EditForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    payload: String,
}

/// `POST /failed/{id}/edit`: checks the edit, records it, retries with it.
pub(crate) async fn edit_and_retry(
    State(state): State<Arc<AppState>>,
    viewer: Viewer,
    operator: Operator,
    Path(id): Path<String>,
    Form(form): Form<EditForm>,
) -> Result<Response> {
    operator.check_csrf(&form.csrf)?;
    operator.require(Role::Admin, "edit and retry")?;
    let id = job_id(&id)?;
    let job = load(&state, id).await?;
    if form.payload.len() > outbox::failed_jobs::MAX_RAW_BODY_BYTES * 16 {
        return Err(DashboardError::BadRequest(
            "the edited payload is too large".into(),
        ));
    }
    // A refused edit shows the form again with the operator's text, so
    // nothing typed is lost.
    if let Err(problem) = outbox::failed_jobs::validate_edit(&job.payload, &form.payload) {
        let page = edit_page(&viewer, &job, &form.payload, Some(&problem.to_string()));
        return Ok((StatusCode::BAD_REQUEST, page).into_response());
    }
    let after = serde_json::from_str(&form.payload).unwrap_or(serde_json::Value::Null);
    audit(
        &state,
        &operator,
        Role::Admin,
        Entry::new("edit_and_retry")
            .job(id)
            .edit(job.payload.clone(), after),
    )
    .await?;
    let (_, channel) = state.broker().await?;
    let edit = outbox::failed_jobs::retry_edited(
        &state.pool,
        &channel,
        id,
        &form.payload,
        &operator.name,
        state.config.confirm_timeout,
    )
    .await?;
    let text = format!(
        "Retried failed job {id} with the edited payload (edit {} kept).",
        edit.id
    );
    Ok(Redirect::to(&link("/failed", &[("notice", Some(&text))])).into_response())
}
