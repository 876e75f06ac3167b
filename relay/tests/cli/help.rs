//! Every subcommand's --help carries an example.

use crate::support::run_outbox;

#[test]
fn every_subcommand_help_has_an_example() {
    let commands: &[&[&str]] = &[
        &["migrate"],
        &["relay"],
        &["pause"],
        &["resume"],
        &["status"],
        &["replay"],
        &["failed"],
        &["failed", "list"],
        &["failed", "show"],
        &["failed", "retry"],
        &["failed", "forget"],
        &["failed", "flush"],
        &["failed", "prune"],
        &["schema"],
        &["schema", "check"],
        &["topology"],
        &["topology", "declare"],
        &["topology", "delete"],
        &["topology", "purge-dead"],
        &["bench"],
        &["bench", "drain"],
        &["bench", "latency"],
        &["bench", "write"],
        &["bench", "consume"],
        &["bench", "seed"],
        &["bench", "all"],
        &["bench", "dashboard"],
        &["bench", "webhooks"],
        &["dashboard"],
        &["webhooks"],
        &["webhooks", "add"],
        &["webhooks", "list"],
        &["webhooks", "show"],
        &["webhooks", "enable"],
        &["webhooks", "disable"],
        &["webhooks", "rotate-secret"],
        &["webhooks", "remove"],
        &["webhooks", "deliveries"],
        &["webhooks", "retry"],
        &["webhooks", "replay"],
        &["webhooks", "test"],
        &["webhooks", "prune"],
    ];
    for command in commands {
        let mut args = command.to_vec();
        args.push("--help");
        let (status, stdout, stderr) = run_outbox(&args, &[]);
        assert_eq!(status, 0, "{args:?}: {stderr}");
        assert!(
            stdout.contains("Example: ") && stdout.contains("outbox "),
            "{args:?} has no example:\n{stdout}"
        );
        // clap shows an unset variable as `[env: NAME=]`, which reads as
        // "set to nothing"; every variable is named without its value.
        let shown_empty: Vec<&str> = stdout.lines().filter(|line| line.contains("=]")).collect();
        assert!(
            shown_empty.is_empty(),
            "{args:?} shows variables as empty: {shown_empty:?}"
        );
    }
    let (status, _, stderr) = run_outbox(&["failed", "retry"], &[]);
    assert_eq!(status, 2, "ids or --all are required: {stderr}");
    let (status, _, stderr) = run_outbox(&["failed", "list", "--limit", "0"], &[]);
    assert_eq!(status, 2, "{stderr}");
    let (status, _, stderr) = run_outbox(&["failed", "flush", "--older-than", "soon"], &[]);
    assert_eq!(status, 2, "{stderr}");
    assert!(stderr.contains("not a duration"), "{stderr}");
}

#[test]
fn new_commands_hide_passwords_when_the_database_is_unreachable() {
    const SECRET: &str = "pg-s3cret-pw";
    let bad_db = format!("postgres://nobody:{SECRET}@127.0.0.1:5432/nothing");
    let commands: &[&[&str]] = &[
        &["status"],
        &["failed", "list"],
        &["failed", "show", "1"],
        &["failed", "forget", "1"],
        &["failed", "flush", "--yes"],
        &["failed", "prune"],
        &["failed", "retry", "1"],
        &[
            "replay",
            "--event-type",
            "site.created",
            "--app",
            "chom",
            "--to-listener",
            "audit",
        ],
    ];
    for command in commands {
        let (status, stdout, stderr) = run_outbox(command, &[("DATABASE_URL", &bad_db)]);
        assert_eq!(status, 1, "{command:?}: {stderr}");
        assert!(
            !stdout.contains(SECRET) && !stderr.contains(SECRET),
            "{command:?}: {stderr}"
        );
        assert!(stderr.contains("nobody:***@"), "{command:?}: {stderr}");
    }
}

#[test]
fn help_names_environment_variables_without_printing_their_values() {
    // Unset, a shown value printed as `[env: OUTBOX_EXCHANGE=]`; set, it
    // could print a secret. Every flag shows `[env: NAME]` alone.
    for command in [
        &["relay"][..],
        &["status"],
        &["replay"],
        &["failed", "retry"],
        &["migrate"],
    ] {
        let mut args = command.to_vec();
        args.push("--help");
        let (status, stdout, stderr) = run_outbox(&args, &[("OUTBOX_BATCH_SIZE", "777")]);
        assert_eq!(status, 0, "{args:?}: {stderr}");
        assert!(stdout.contains("[env: "), "{args:?}:\n{stdout}");
        assert!(
            !stdout.contains("=]"),
            "{args:?} prints an empty env value:\n{stdout}"
        );
        assert!(!stdout.contains("777"), "{args:?} prints an env value:\n{stdout}");
    }
    let (_, stdout, _) = run_outbox(&["relay", "--help"], &[]);
    for name in ["[env: DATABASE_URL]", "[env: AMQP_URL]", "[env: OUTBOX_EXCHANGE]"] {
        assert!(stdout.contains(name), "{name}:\n{stdout}");
    }
}
