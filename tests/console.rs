//! The operator console (issue #22) as a person uses it, in headless Chromium: the live view
//! shows a tile per camera with its frame, the verdict sentence and its rate; a defect whose
//! event is on the defects topic is in the gallery, and its detail page shows the frame, the
//! overlay and the map; the answer buttons are refused without the token (the console listens
//! beyond localhost) and teach the bank with it; a question in the question box is answered
//! in line with the verdict; the products view shows the new version.
//! Screenshots go to `$CARGO_TARGET_TMPDIR/console/`.

use kensa_core::config::LearnMode;
use kensa_tests::*;
use std::time::Duration;

const TOKEN: &str = "console-test-token-0123456789";

fn is_answer(s: &str) -> bool {
    s == "No, there is no anomaly in the image."
        || (s.starts_with("Yes, there is an anomaly in the image, at the ") && s.ends_with(" of the image."))
        || (s.starts_with("Yes, there are ") && s.contains(" anomalies in the image, they are at the "))
}

#[test]
fn an_operator_sees_the_cameras_and_answers_a_defect_in_a_browser() {
    let (dir, bank, topic, _) = rig("console");
    let port = free_port();
    let local = format!("127.0.0.1:{port}");
    let mut cfg = base_config(&bank, &topic, &brokers(), &format!("0.0.0.0:{port}"));
    cfg.telemetry.token = Some(TOKEN.into());
    cfg.products.get_mut("disc").unwrap().learn = LearnMode::Feedback;
    cfg.learn.hold = 4096;
    cfg.ask.model = Some(kensa_eval::ask::default_chat_model());
    cfg.console.defects = 64;
    cfg.cameras.push(synthetic_camera("cam-a", 5, 0, 3.0, 0.5));
    cfg.cameras.push(synthetic_camera("cam-b", 6, 0, 3.0, 0.5));
    let mut daemon = Daemon::start(&write_config(dir.path(), &cfg), &[], &local);
    let defects = consume_until(&brokers(), &format!("{topic}.defects"), Duration::from_secs(120), |r| r.len() >= 2)
        .unwrap_or_else(|e| panic!("{e}\n{}", daemon.log_text()));
    let out = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("console");

    let browser = Browser::start(1400, 1250);
    // Live view: a tile per camera, filled by the live stream.
    browser.goto(&format!("http://{local}/console"));
    let live = r#"return document.body.dataset.live === "1" &&
        [...document.querySelectorAll("article.tile")].filter(t => {
            const img = t.querySelector("img.frame");
            return img && img.complete && img.naturalWidth > 0 && Number(t.querySelector(".fps").textContent) > 0;
        }).length === 2;"#;
    assert!(browser.wait_until(Duration::from_secs(60), live), "two live tiles\n{}", browser.source());
    let tiles = browser.script(
        r#"return [...document.querySelectorAll("article.tile")].map(t => ({
            camera: t.dataset.camera, state: t.querySelector(".state").textContent,
            answer: t.querySelector(".answer").textContent }));"#,
    );
    let tiles = tiles.as_array().unwrap();
    let cams: Vec<&str> = tiles.iter().map(|t| t["camera"].as_str().unwrap()).collect();
    assert_eq!(cams, ["cam-a", "cam-b"]);
    for t in tiles {
        assert_eq!(t["state"], "up", "{t}");
        assert!(is_answer(t["answer"].as_str().unwrap()), "AnomalyGPT's words: {t}");
    }
    browser.screenshot(&out.join("live.png"));

    // The gallery holds defects that are on the defects topic.
    browser.goto(&format!("http://{local}/console/defects"));
    let held: Vec<String> = browser
        .script(r#"return [...document.querySelectorAll("article.card")].map(c => c.dataset.event);"#)
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    let on_topic: Vec<&kensa_publish::InspectionEvent> = defects.iter().map(|r| &r.event).collect();
    let shown = on_topic
        .iter()
        .find(|e| held.contains(&e.event_id))
        .unwrap_or_else(|| panic!("no defect of the topic in the gallery: {held:?}"));
    assert!(shown.anomalous);
    let cams_of = |b: &Browser| -> Vec<String> {
        b.script(r#"return [...document.querySelectorAll("article.card")].map(c => c.dataset.camera);"#)
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    };
    let all = cams_of(&browser);
    let camera = &all[0];
    browser.goto(&format!("http://{local}/console/defects?camera={camera}"));
    let filtered = cams_of(&browser);
    assert!(!filtered.is_empty() && filtered.iter().all(|c| c == camera), "the camera filter: {filtered:?} of {all:?}");

    // Its detail: frame, overlay and map, the answer, the judge, the bank version.
    let id = shown.event_id.replace('/', "%2F");
    browser.goto(&format!("http://{local}/console/defect?id={id}"));
    let pictures = r#"return [...document.querySelectorAll(".full img")].filter(i => i.complete && i.naturalWidth > 0).length === 3;"#;
    assert!(browser.wait_until(Duration::from_secs(30), pictures), "{}", browser.source());
    let page = browser.source();
    assert!(page.contains(&shown.answer), "the event's answer on the page");
    assert!(page.contains(&shown.bank_version), "its bank version");
    assert!(page.contains(&shown.event_id));
    browser.screenshot(&out.join("defect.png"));

    // Answering: without the token the listener refuses (it listens beyond localhost) and the
    // page says so; with it the answer is learned as a new bank version.
    browser.type_into("#who", "op-3");
    browser.click("button[data-label=defect]");
    let answered = r#"return document.getElementById("feedback-result").dataset.status !== undefined;"#;
    assert!(browser.wait_until(Duration::from_secs(30), answered));
    let status = browser.script(r#"return document.getElementById("feedback-result").dataset.status;"#);
    assert_eq!(status, "401", "{}", browser.source());
    browser.type_into("#token", TOKEN);
    browser.script(r#"delete document.getElementById("feedback-result").dataset.status; return true;"#);
    browser.click("button[data-label=defect]");
    assert!(browser.wait_until(Duration::from_secs(90), answered), "{}", daemon.log_text());
    let result = browser.script(
        r#"const r = document.getElementById("feedback-result"); return [r.dataset.status, r.dataset.result, r.textContent];"#,
    );
    assert_eq!(
        (result[0].as_str(), result[1].as_str()),
        (Some("200"), Some("changed")),
        "{result}\n{}",
        daemon.log_text()
    );
    // A question about it, in the question box: answered by the instruction model, in line
    // with the verdict.
    browser.type_into("#question", "Is the part fine?");
    browser.click("#ask-form button");
    let asked = r#"return document.getElementById("ask-status").dataset.status !== undefined;"#;
    assert!(browser.wait_until(Duration::from_secs(90), asked), "{}", daemon.log_text());
    let dialogue = browser.script(
        r##"return [document.getElementById("ask-status").dataset.status,
            [...document.querySelectorAll("#dialogue li .a")].map(a => a.textContent)];"##,
    );
    assert_eq!(dialogue[0], "200", "{dialogue}");
    let answers = dialogue[1].as_array().unwrap();
    assert_eq!(answers.len(), 2, "the verdict, then the answer: {dialogue}");
    assert!(answers[1].as_str().unwrap().starts_with("No"), "a defect is not fine: {dialogue}");
    browser.screenshot(&out.join("answered.png"));
    let text = daemon.scrape();
    assert_eq!(metric(&text, "kensa_feedback_total", &[("source", "http"), ("result", "refused")]), Some(1.0));
    assert_eq!(metric(&text, "kensa_bank_learning_total", &[("change", "defect")]), Some(1.0));

    // Products: the bank's new version is current, the enrolled one is in its history, and
    // the four references are shown.
    browser.goto(&format!("http://{local}/console/products"));
    let products = browser.script(
        r#"return { version: document.querySelector(".bank-version").textContent,
            refs: [...document.querySelectorAll(".ref img")].filter(i => i.naturalWidth > 0).length,
            versions: document.querySelectorAll("table.versions tr").length - 1 };"#,
    );
    assert_eq!(products["refs"], 4, "{products}");
    assert!(products["versions"].as_u64().unwrap() >= 2, "{products}");
    let learned = result[2].as_str().unwrap();
    assert!(learned.contains(products["version"].as_str().unwrap()), "{learned} vs {products}");
    browser.screenshot(&out.join("products.png"));
    // A viewer on the live view does not hold the daemon up when it stops.
    browser.goto(&format!("http://{local}/console"));
    assert!(browser.wait_until(Duration::from_secs(30), r#"return document.body.dataset.live === "1";"#));
    assert_eq!(daemon.terminate(Duration::from_secs(60)), Some(0), "{}", daemon.log_text());
    drop(browser);
}

#[test]
fn read_only_views_are_open_and_answers_need_json() {
    let (dir, bank, topic, metrics) = rig("console-open");
    let mut cfg = base_config(&bank, &topic, &brokers(), &metrics);
    cfg.products.get_mut("disc").unwrap().learn = LearnMode::Feedback;
    cfg.cameras.push(synthetic_camera("cam-1", 9, 0, 4.0, 0.0));
    let mut daemon = Daemon::start(&write_config(dir.path(), &cfg), &[], &metrics);
    daemon.scrape();
    for page in ["/console", "/console/defects", "/console/products", "/console/assets/console.js"] {
        let (code, body) = http_get(&metrics, page).unwrap();
        assert_eq!(code, 200, "{page}: {body}");
    }
    let (code, body) = http_get(&metrics, "/console/defect?id=cam-1%2Fnope%2F1").unwrap();
    assert_eq!(code, 404, "{body}");
    assert!(body.contains("no longer held"));
    let (code, _) = http_get(&metrics, "/console/picture?id=x&kind=nonsense").unwrap();
    assert_eq!(code, 400);
    // A form post (what another site's page could send without a preflight) is refused.
    let mut s = std::net::TcpStream::connect(&metrics).unwrap();
    let body = r#"{"event_id":"cam-1/x/1","label":"normal"}"#;
    std::io::Write::write_all(
        &mut s,
        format!(
            "POST /v1/feedback HTTP/1.0\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .unwrap();
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut s, &mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.0 415") || answer.starts_with("HTTP/1.1 415"), "{answer}");
    assert_eq!(daemon.terminate(Duration::from_secs(60)), Some(0), "{}", daemon.log_text());
}
