//! The command line as scripts see it: exit codes (one per outcome, README "Command line"),
//! shell completions and man pages, `--json` as a flag everywhere, "did you mean" for config
//! keys, sentences instead of debug text, and `job watch` on a real node process following jobs
//! that succeed, fail and are cancelled. Waits are polls with deadlines.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use tidepool::datasets;
use tidepool::exit::Exit;
use tidepool::jobs_cli;
use tidepool::local_cluster::LocalCluster;
use tidepool_runtime::client::ClientOptions;
use tidepool_runtime::control::JobState;
use tidepool_runtime::dataset::Table;

const BIN: &str = env!("CARGO_BIN_EXE_tidepool");

fn run(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn code(o: &Output) -> i32 {
    o.status.code().expect("exited, not killed")
}

fn assert_exit(o: &Output, want: Exit, what: &str) {
    assert_eq!(
        code(o),
        i32::from(want.code()),
        "{what}: expected {want:?}\nstdout: {}\nstderr: {}",
        stdout(o),
        stderr(o)
    );
}

#[test]
fn help_lists_the_exit_codes() {
    let o = run(&["--help"]);
    assert_exit(&o, Exit::Success, "--help");
    let help = stdout(&o);
    assert!(help.contains("Exit codes:"), "{help}");
    for e in Exit::ALL {
        let line = format!("{:>2}  {}", e.code(), e.meaning());
        assert!(help.contains(&line), "--help lacks {line:?}:\n{help}");
    }
    assert_exit(&run(&["job", "watch"]), Exit::Usage, "missing job id");
    assert_exit(&run(&["no-such-command"]), Exit::Usage, "unknown command");
}

#[test]
fn completions_name_the_subcommands() {
    let o = run(&["completions", "bash"]);
    assert_exit(&o, Exit::Success, "completions bash");
    let script = stdout(&o);
    for word in [
        "tidepool",
        "cluster",
        "job",
        "watch",
        "dataset",
        "--connect",
    ] {
        assert!(script.contains(word), "bash completion lacks {word}");
    }
    for shell in ["zsh", "fish"] {
        let o = run(&["completions", shell]);
        assert_exit(&o, Exit::Success, shell);
        assert!(
            stdout(&o).contains("watch"),
            "{shell} completion lacks job watch"
        );
    }
    assert_exit(
        &run(&["completions", "cmd.exe"]),
        Exit::Usage,
        "unknown shell",
    );
}

#[test]
fn man_pages_render() {
    let o = run(&["man"]);
    assert_exit(&o, Exit::Success, "man");
    let page = stdout(&o);
    assert!(page.contains(".TH tidepool 1"), "{page}");
    assert!(page.contains("completions"), "subcommands listed");

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("man1");
    let o = run(&["man", "--out", out.to_str().unwrap()]);
    assert_exit(&o, Exit::Success, "man --out");
    for name in [
        "tidepool.1",
        "tidepool-job-watch.1",
        "tidepool-cluster-drain.1",
    ] {
        let text = std::fs::read_to_string(out.join(name)).unwrap();
        assert!(text.contains(".TH"), "{name}: {text}");
    }
    assert!(
        stdout(&o).contains("tidepool-job-watch.1"),
        "lists the pages"
    );
}

/// The subcommands `tidepool PATH --help` lists under "Commands:".
fn subcommands(path: &[String]) -> Vec<String> {
    let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
    args.push("--help");
    let help = stdout(&run(&args));
    help.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_owned)
        .collect()
}

/// Every command's `--help`: where `--json` exists it takes no value, and no flag that writes
/// a file is spelled `--json PATH` (those are `--out PATH`, or `chaos run --report PATH`).
#[test]
fn json_is_a_flag_on_every_command() {
    let mut todo = vec![Vec::<String>::new()];
    let (mut leaves, mut with_json) = (0, 0);
    while let Some(path) = todo.pop() {
        let subs = subcommands(&path);
        if !subs.is_empty() {
            for s in subs {
                let mut p = path.clone();
                p.push(s);
                todo.push(p);
            }
            continue;
        }
        leaves += 1;
        let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
        args.push("--help");
        let o = run(&args);
        assert_exit(&o, Exit::Success, &path.join(" "));
        for line in stdout(&o).lines().filter(|l| l.contains("--json")) {
            with_json += 1;
            assert!(
                !line.contains("--json <"),
                "tidepool {}: --json takes a value: {line}",
                path.join(" ")
            );
        }
    }
    assert!(leaves > 25, "only {leaves} commands found");
    assert!(with_json > 20, "only {with_json} commands have --json");
    for bench in ["train", "failover"] {
        let help = stdout(&run(&["bench", bench, "--help"]));
        assert!(help.contains("--out <OUT>"), "bench {bench}: {help}");
    }
}

#[test]
fn unknown_config_key_suggests_the_right_one() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("node.toml");
    std::fs::write(&file, "[transport]\nmax_frame_byts = 1048576\n").unwrap();
    let o = run(&["config", "check", file.to_str().unwrap()]);
    assert_exit(&o, Exit::Config, "config check");
    let err = stderr(&o);
    assert!(
        err.contains("transport.max_frame_byts")
            && err.contains("did you mean `transport.max_frame_bytes`?"),
        "{err}"
    );
    let o = run(&["config", "check", "--json", file.to_str().unwrap()]);
    assert_exit(&o, Exit::Config, "config check --json");
    let doc: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(doc["valid"], false, "{doc}");
}

/// Client certificates, and a UDP port nothing listens on: no node answers.
#[test]
fn nothing_listening_is_unreachable() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, me) = (dir.path().join("ca"), dir.path().join("me"));
    let o = run(&["certs", "init", "--json", "--out", ca.to_str().unwrap()]);
    assert_exit(&o, Exit::Success, "certs init");
    let o = run(&[
        "certs",
        "issue",
        "--ca",
        ca.to_str().unwrap(),
        "--client",
        "me",
        "--role",
        "admin",
        "--out",
        me.to_str().unwrap(),
    ]);
    assert_exit(&o, Exit::Success, "certs issue");
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port(); // bound then dropped: nothing listens there now
    let o = run(&[
        "cluster",
        "status",
        "--connect",
        &format!("127.0.0.1:{port}"),
        "--cert-dir",
        me.to_str().unwrap(),
    ]);
    assert_exit(&o, Exit::Unreachable, "cluster status");
    assert!(stderr(&o).contains("no node reachable"), "{}", stderr(&o));
}

// ---- On a real node ------------------------------------------------------------------------

/// Frame cap of the test node: small enough that a 1000-class softmax fails at run time.
const FRAME: u64 = 2 << 20;

fn cli(c: &LocalCluster, args: &[&str]) -> Output {
    c.cli(args).unwrap()
}

fn wide_table(rows: usize, features: usize, classes: usize) -> Table {
    Table {
        features: (0..features).map(|j| format!("x{j}")).collect(),
        label: "y".into(),
        rows,
        x: (0..rows * features)
            .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
            .collect(),
        y: (0..rows)
            .map(|i| if i + 1 == rows { classes - 1 } else { i % classes } as f32)
            .collect(),
    }
}

fn logistic(dataset: &str, epochs: u64) -> String {
    format!(
        "[job]\nkind = \"sgd\"\ndataset = \"{dataset}\"\n[model]\ntype = \"logistic\"\n\
         [train]\nepochs = {epochs}\nbatch_size = 16\nlearning_rate = 0.1\nseed = 7\n"
    )
}

/// Waits for a child process with a deadline (polling; killed if it runs past it).
fn wait_child(child: &mut std::process::Child, timeout: Duration) -> i32 {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code().expect("exited, not killed");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("child still running after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(100)); // poll interval
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_codes_and_job_watch_on_a_node() {
    let mut c = LocalCluster::create(Path::new(BIN), 1, 8, 1).unwrap();
    c.env = vec![(
        "TIDEPOOL_TRANSPORT__MAX_FRAME_BYTES".into(),
        FRAME.to_string(),
    )];
    c.start_all().unwrap();
    let opts = ClientOptions {
        retry_for: Duration::from_secs(60),
        ..Default::default()
    };
    let client = c.settled_admin_client(opts).await.unwrap();

    // A dataset imported twice: the second is refused with a sentence, not debug text.
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("bc.csv");
    datasets::write_csv(&datasets::builtin("breast_cancer").unwrap(), &csv).unwrap();
    let import = ["dataset", "import", csv.to_str().unwrap(), "--name", "bc"];
    let first = cli(&c, &[&import[..], &["--label", "target"]].concat());
    assert_exit(&first, Exit::Success, "first import");
    let again = cli(&c, &[&import[..], &["--label", "target"]].concat());
    assert_exit(&again, Exit::Refused, "second import");
    assert_eq!(
        stderr(&again).trim(),
        "tidepool: dataset \"bc\" already exists; choose another --name or delete it first \
         (tidepool dataset delete bc)"
    );
    // The same name through `dataset synth`.
    let synth = cli(&c, &["dataset", "synth", "--name", "bc", "--rows", "10"]);
    assert_exit(&synth, Exit::Refused, "synth under a taken name");
    assert!(stderr(&synth).contains("already exists; choose another --name"));

    // Unknown names: not found, saying what.
    for (args, says) in [
        (vec!["job", "status", "nosuch"], "no job \"nosuch\""),
        (vec!["job", "watch", "nosuch"], "no job \"nosuch\""),
        (vec!["job", "cancel", "nosuch"], "no job \"nosuch\""),
        (vec!["job", "result", "nosuch"], "no job \"nosuch\""),
        (vec!["dataset", "delete", "nosuch"], "no dataset \"nosuch\""),
        (
            vec!["cluster", "drain", "ghost"],
            "no member named \"ghost\"",
        ),
        (
            vec!["cluster", "undrain", "ghost"],
            "no member named \"ghost\"",
        ),
        (
            vec!["cluster", "voters", "add", "ghost"],
            "no member named \"ghost\"",
        ),
        (
            vec!["cluster", "voters", "remove", "ghost"],
            "no member named \"ghost\"",
        ),
    ] {
        let o = cli(&c, &args);
        let what = args.join(" ");
        assert_exit(&o, Exit::NotFound, &what);
        assert!(stderr(&o).contains(says), "{what}: {}", stderr(&o));
        assert!(
            !stderr(&o).contains("Rejected(") && !stderr(&o).contains("BadRequest"),
            "{what}: debug text: {}",
            stderr(&o)
        );
    }
    // A reader may not delete: refused.
    let o = Command::new(BIN)
        .args(["dataset", "delete", "bc"])
        .env("TIDEPOOL_CONNECT", c.seeds()[0].to_string())
        .env("TIDEPOOL_CERT_DIR", c.reader_dir())
        .output()
        .unwrap();
    assert_exit(&o, Exit::Refused, "reader deletes");

    // A job submitted elsewhere, watched to success: one JSON document, exit 0.
    let ok = jobs_cli::submit(&client, &logistic("bc", 2)).await.unwrap();
    let o = cli(&c, &["job", "watch", &ok, "--json"]);
    assert_exit(&o, Exit::Success, "watch a succeeding job");
    let doc: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(doc["id"], ok.as_str(), "{doc}");
    assert_eq!(doc["state"], "succeeded", "{doc}");

    // A job that fails at run time (its task message outgrows the frame cap): exit 6, from
    // `job watch` and from `job submit --wait` alike.
    jobs_cli::import_table(&client, &wide_table(64, 300, 1000), "many")
        .await
        .unwrap();
    let softmax = "[job]\nkind = \"sgd\"\ndataset = \"many\"\n[model]\ntype = \"softmax\"\n\
                   [train]\nepochs = 1\nbatch_size = 64\nlearning_rate = 0.1\nseed = 7\n";
    let spec = dir.path().join("fails.toml");
    std::fs::write(&spec, softmax).unwrap();
    let o = cli(&c, &["job", "submit", spec.to_str().unwrap(), "--wait"]);
    assert_exit(&o, Exit::JobFailed, "submit --wait of a failing job");
    assert!(stdout(&o).contains("failed"), "{}", stdout(&o));
    assert!(stderr(&o).contains("ended failed"), "{}", stderr(&o));
    let failed = jobs_cli::submit(&client, softmax).await.unwrap();
    let o = cli(&c, &["job", "watch", &failed]);
    assert_exit(&o, Exit::JobFailed, "watch a failing job");

    // A long job watched from another process, cancelled meanwhile: exit 7.
    let long = jobs_cli::submit(&client, &logistic("bc", 100_000))
        .await
        .unwrap();
    let mut watcher = Command::new(BIN)
        .args(["job", "watch", &long])
        .env("TIDEPOOL_CONNECT", c.seeds()[0].to_string())
        .env("TIDEPOOL_CERT_DIR", c.admin_dir())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let rec = jobs_cli::status(&client, &long).await.unwrap();
        if rec.state == JobState::Running && rec.step > 0 {
            break;
        }
        assert!(!rec.state.is_terminal(), "ended early: {rec:?}");
        assert!(Instant::now() < deadline, "never ran: {rec:?}");
        tokio::time::sleep(Duration::from_millis(100)).await; // poll interval
    }
    assert!(
        watcher.try_wait().unwrap().is_none(),
        "job watch returned while the job runs"
    );
    let o = cli(&c, &["job", "cancel", &long]);
    assert_exit(&o, Exit::Success, "cancel");
    let code = wait_child(&mut watcher, Duration::from_secs(60));
    let out = watcher.wait_with_output().unwrap();
    assert_eq!(
        code,
        i32::from(Exit::JobCancelled.code()),
        "watch of a cancelled job: {}",
        stderr(&out)
    );
    assert!(stdout(&out).contains("cancelled"), "{}", stdout(&out));

    client.close().await;
    c.stop_all(Duration::from_secs(30)).await.unwrap();
}
