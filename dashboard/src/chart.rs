//! The overview's "published per minute" chart: bars drawn as inline SVG
//! on the server (no script, no image request), each with its figure as a
//! tooltip.

use maud::{Markup, html};
use outbox::relay::history::PublishedMinute;

const WIDTH: f64 = 1140.0;
const HEIGHT: f64 = 110.0;

/// The chart of `minutes`, oldest first.
pub(crate) fn published_per_minute(minutes: &[PublishedMinute]) -> Markup {
    let max = minutes.iter().map(|m| m.published).max().unwrap_or(0).max(1);
    let total: i64 = minutes.iter().map(|m| m.published).sum();
    let slot = WIDTH / minutes.len().max(1) as f64;
    let label = format!(
        "events published per minute over the last {} minutes: {total} in all, at most {max} in a minute",
        minutes.len()
    );
    html! {
        figure.chart {
            svg xmlns="http://www.w3.org/2000/svg" viewBox=(format!("0 0 {WIDTH} {}", HEIGHT + 16.0)) role="img" aria-label=(label) {
                line.axis x1="0" y1=(HEIGHT) x2=(WIDTH) y2=(HEIGHT) {}
                @for (i, minute) in minutes.iter().enumerate() {
                    @let h = (minute.published as f64 / max as f64) * (HEIGHT - 4.0);
                    rect.bar x=(format!("{:.1}", i as f64 * slot + 1.0)) y=(format!("{:.1}", HEIGHT - h))
                        width=(format!("{:.1}", (slot - 2.0).max(1.0))) height=(format!("{h:.1}")) {
                        title { (minute.minute.format("%H:%M")) ": " (minute.published) }
                    }
                }
                text.tick x="0" y=(HEIGHT + 13.0) { "-" (minutes.len()) " min" }
                text.tick x=(WIDTH) y=(HEIGHT + 13.0) text-anchor="end" { "now" }
                text.tick x="2" y="10" { "max " (max) "/min" }
            }
            figcaption { (total) " events published in the last " (minutes.len()) " minutes" }
        }
    }
}
