//! The console's HTML, rendered on the server: one layout, four views. Every value from a frame,
//! a config or a bank is escaped; the pages load only `/console/assets/*` and pictures from
//! `/console/picture`.

use crate::board::{Said, Shot, Tile};
use std::fmt::Write as _;

/// What the detail page offers for answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answering {
    /// The product does not learn from the line: no buttons.
    Off,
    /// Buttons; `token`: the listener needs `Authorization: Bearer` (a field asks for it).
    On { token: bool },
    /// Actions are refused on this listener (beyond localhost without `telemetry.token`).
    Refused,
}

/// HTML-escapes text for element content and quoted attributes.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Percent-encodes a query value (event ids hold `/`).
pub fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

fn picture_url(id: &str, kind: &str) -> String {
    format!("/console/picture?kind={kind}&amp;id={}", enc(id))
}

/// The page around a view; `nav` is the active tab.
pub fn layout(title: &str, nav: &str, body: &str) -> String {
    let tab = |href: &str, name: &str| {
        let class = if name == nav { " class=\"active\"" } else { "" };
        format!("<a href=\"{href}\"{class}>{name}</a>")
    };
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{title} · Kensa</title><link rel=\"stylesheet\" href=\"/console/assets/console.css\"></head>\
         <body data-view=\"{view}\"><header><span class=\"brand\" title=\"検査, inspection\">Kensa</span><nav>{live}{defects}{products}</nav>\
         <span class=\"version\">v{version}</span></header><main>{body}</main>\
         <script src=\"/console/assets/console.js\"></script></body></html>\n",
        title = esc(title),
        view = esc(nav),
        live = tab("/console", "Live"),
        defects = tab("/console/defects", "Defects"),
        products = tab("/console/products", "Products"),
        version = env!("CARGO_PKG_VERSION"),
    )
}

fn verdict_class(s: &Said) -> &'static str {
    if s.anomalous {
        "bad"
    } else {
        "good"
    }
}

/// A time for the page's script to show in local time (`data-ms`), with UTC seconds as text.
fn when(unix_ms: i64) -> String {
    format!("<time class=\"ts\" data-ms=\"{unix_ms}\">{}</time>", unix_ms / 1000)
}

/// Live view: one tile per camera, filled again by the live stream.
pub fn live(tiles: &[Tile]) -> String {
    let mut b = String::from("<h1>Live</h1><section class=\"tiles\" id=\"tiles\">");
    for t in tiles {
        let (img, answer, class, conf, id) = match &t.latest {
            Some(l) => (
                format!(
                    "<a href=\"/console/defect?id={2}\"><img class=\"frame\" alt=\"latest frame of {0}\" src=\"{1}\"></a>",
                    esc(&t.camera),
                    picture_url(&l.event_id, "tile"),
                    enc(&l.event_id)
                ),
                esc(&l.decided.answer),
                verdict_class(&l.decided),
                format!("{:.0} %", l.decided.confidence * 100.0),
                esc(&l.event_id),
            ),
            None => (
                "<div class=\"frame empty\">no frame yet</div>".to_string(),
                String::new(),
                "none",
                String::new(),
                String::new(),
            ),
        };
        let _ = write!(
            b,
            "<article class=\"tile {class}\" data-camera=\"{cam}\" data-event=\"{id}\">\
             <h2>{cam} <span class=\"state s-{state}\" title=\"{detail}\">{state}</span></h2>{img}\
             <p class=\"answer\">{answer}</p>\
             <p class=\"meta\"><span class=\"conf\">{conf}</span> · <span class=\"fps\">{fps:.1}</span> fps · \
             <span class=\"frames\">{frames}</span> frames</p></article>",
            cam = esc(&t.camera),
            state = esc(&t.state),
            detail = esc(&t.detail),
            fps = t.fps,
            frames = t.frames,
        );
    }
    b.push_str("</section>");
    if tiles.is_empty() {
        b.push_str("<p>No camera is configured.</p>");
    }
    layout("Live", "Live", &b)
}

fn judges_line(s: &Shot) -> String {
    let said: Vec<String> = s
        .judges
        .iter()
        .map(|j| {
            format!(
                "<span class=\"judge {}\">{}: {} ({:.0} %)</span>",
                verdict_class(j),
                esc(&j.judge),
                if j.anomalous { "defect" } else { "normal" },
                j.confidence * 100.0
            )
        })
        .collect();
    let agree = if s.judges.len() < 2 {
        ""
    } else if s.judges_agree() {
        " <span class=\"agree\">agree</span>"
    } else {
        " <span class=\"disagree\">disagree</span>"
    };
    format!("{}{agree}", said.join(" "))
}

/// The filter form's options: (value, selected).
pub struct Filter<'a> {
    pub cameras: &'a [String],
    pub products: &'a [String],
    pub camera: Option<&'a str>,
    pub product: Option<&'a str>,
}

fn select(name: &str, all: &[String], chosen: Option<&str>) -> String {
    let mut s = format!("<label>{name} <select name=\"{name}\"><option value=\"\">all</option>");
    for v in all {
        let sel = if Some(v.as_str()) == chosen { " selected" } else { "" };
        let _ = write!(s, "<option value=\"{0}\"{sel}>{0}</option>", esc(v));
    }
    s.push_str("</select></label>");
    s
}

/// Gallery of the recent anomalous frames, newest first.
pub fn defects(shots: &[std::sync::Arc<Shot>], f: &Filter<'_>) -> String {
    let mut b = format!(
        "<h1>Recent defects</h1><form class=\"filter\" method=\"get\">{}{}<noscript><button>filter</button></noscript></form>\
         <section class=\"gallery\" id=\"gallery\">",
        select("camera", f.cameras, f.camera),
        select("product", f.products, f.product)
    );
    for s in shots {
        let _ = write!(
            b,
            "<article class=\"card\" data-event=\"{id}\" data-camera=\"{cam}\" data-product=\"{prod}\">\
             <a href=\"/console/defect?id={qid}\"><div class=\"pair\"><img alt=\"frame\" src=\"{thumb}\">\
             <img alt=\"overlay\" src=\"{tile}\"></div></a><p class=\"answer\">{answer}</p>\
             <p class=\"cells\">{cells}</p><p class=\"judges\">{judges}</p>\
             <p class=\"meta\">{cam} · {prod} · #{seq} · {when} · bank {bank}</p></article>",
            id = esc(&s.event_id),
            qid = enc(&s.event_id),
            cam = esc(&s.camera),
            prod = esc(&s.product),
            thumb = picture_url(&s.event_id, "thumb"),
            tile = picture_url(&s.event_id, "tile"),
            answer = esc(&s.decided.answer),
            cells = esc(&s.cells.join(", ")),
            judges = judges_line(s),
            seq = s.seq,
            when = when(s.captured_unix_ms),
            bank = esc(&s.bank_version),
        );
    }
    b.push_str("</section>");
    if shots.is_empty() {
        b.push_str("<p class=\"empty\">No anomalous frame is held (the newest are kept, up to console.defects).</p>");
    }
    layout("Defects", "Defects", &b)
}

/// One frame in full: frame, overlay and map, every judge, the answer buttons, and the
/// question box when `asking` (Some(token needed)).
pub fn detail(s: &Shot, answering: &Answering, asking: Option<bool>) -> String {
    let mut b = format!(
        "<h1>{cam} #{seq}</h1><p class=\"answer big {class}\" id=\"answer\">{answer}</p>\
         <section class=\"full\"><figure><img alt=\"frame\" src=\"{image}\"><figcaption>frame</figcaption></figure>\
         <figure><img alt=\"overlay\" src=\"{overlay}\"><figcaption>overlay, regions outlined</figcaption></figure>\
         <figure><img alt=\"map\" src=\"{map}\"><figcaption>anomaly map</figcaption></figure></section>\
         <table class=\"facts\"><tr><th>event</th><td id=\"event-id\">{id}</td></tr>\
         <tr><th>camera · product</th><td>{cam} · {prod}</td></tr><tr><th>part</th><td>{part}</td></tr>\
         <tr><th>captured</th><td>{when}</td></tr>\
         <tr><th>score · confidence</th><td>{score:.4} · {conf:.0} %</td></tr>\
         <tr><th>cells</th><td>{cells}</td></tr><tr><th>judges</th><td>{judges}</td></tr>\
         <tr><th>bank version</th><td>{bank}</td></tr></table>",
        cam = esc(&s.camera),
        seq = s.seq,
        class = verdict_class(&s.decided),
        answer = esc(&s.decided.answer),
        image = picture_url(&s.event_id, "image"),
        overlay = picture_url(&s.event_id, "overlay"),
        map = picture_url(&s.event_id, "map"),
        id = esc(&s.event_id),
        prod = esc(&s.product),
        part = esc(&s.part_id),
        when = when(s.captured_unix_ms),
        score = s.decided.score,
        conf = s.decided.confidence * 100.0,
        cells = esc(&s.cells.join(", ")),
        judges = judges_line(s),
        bank = esc(&s.bank_version),
    );
    match answering {
        Answering::Off => {
            let _ = write!(
                b,
                "<p class=\"note\">Product {} does not learn from the line (products.{}.learn), so there is nothing to answer.</p>",
                esc(&s.product),
                esc(&s.product)
            );
        }
        Answering::Refused => b.push_str(
            "<p class=\"note\">Answers are refused on this listener: it listens beyond localhost and no telemetry.token is set.</p>",
        ),
        Answering::On { token } => {
            let token_field = if *token {
                "<label>token <input type=\"password\" id=\"token\" autocomplete=\"off\" placeholder=\"telemetry.token\"></label>"
            } else {
                ""
            };
            let _ = write!(
                b,
                "<section class=\"feedback\" id=\"feedback\" data-event=\"{id}\"><h2>Was this part fine?</h2>\
                 <label>who <input id=\"who\" placeholder=\"operator\"></label>{token_field}\
                 <button class=\"good\" data-label=\"normal\">normal</button>\
                 <button class=\"bad\" data-label=\"defect\">defect</button>\
                 <p id=\"feedback-result\" role=\"status\"></p></section>",
                id = esc(&s.event_id)
            );
        }
    }
    if let Some(token) = asking {
        let token_field = if token && !matches!(answering, Answering::On { token: true }) {
            "<label>token <input type=\"password\" id=\"token\" autocomplete=\"off\" placeholder=\"telemetry.token\"></label>"
        } else {
            ""
        };
        let _ = write!(
            b,
            "<section class=\"ask\" id=\"ask\" data-event=\"{id}\"><h2>Ask about this frame</h2>\
             <ol id=\"dialogue\"><li class=\"turn\"><p class=\"q\">Is there any anomaly in the image?</p>\
             <p class=\"a\">{answer}</p></li></ol>{token_field}\
             <form id=\"ask-form\"><input id=\"question\" maxlength=\"500\" placeholder=\"Where is it? How large? What could it be?\">\
             <button>ask</button></form><p id=\"ask-status\" role=\"status\"></p></section>",
            id = esc(&s.event_id),
            answer = esc(&s.decided.answer),
        );
    }
    layout(&format!("{} #{}", s.camera, s.seq), "Defects", &b)
}

/// A product's bank as the products view shows it.
pub struct ProductView {
    pub name: String,
    pub bank: String,
    pub learns: bool,
    /// None: the bank could not be read (the reason).
    pub meta: Result<kensa_model::bank::BankMeta, String>,
    pub versions: Vec<kensa_model::versions::VersionInfo>,
}

/// Each product: its bank, references, decision and how it was fitted, and its versions.
pub fn products(list: &[ProductView]) -> String {
    let mut b = String::from("<h1>Products</h1>");
    for p in list {
        let _ = write!(
            b,
            "<section class=\"product\" data-product=\"{0}\"><h2>{0}</h2><p class=\"meta\">bank {1} · learning {2}</p>",
            esc(&p.name),
            esc(&p.bank),
            if p.learns { "on" } else { "off" }
        );
        match &p.meta {
            Err(e) => {
                let _ = write!(b, "<p class=\"note\">{}</p>", esc(e));
            }
            Ok(m) => {
                let c = &m.calibration;
                let _ = write!(
                    b,
                    "<table class=\"facts\"><tr><th>version</th><td class=\"bank-version\">{version}</td></tr>\
                     <tr><th>references</th><td>{refs}</td></tr>\
                     <tr><th>decision</th><td>anomalous when the map's maximum reaches {it:.4}; regions above {pt:.4}</td></tr>\
                     <tr><th>fitted</th><td>{method}: balanced accuracy {ba:.3} on {n} pseudo-normal and {a} pseudo-anomalous samples; region level F1 {f1:.3}</td></tr></table>\
                     <div class=\"refs\">",
                    version = esc(&m.version()),
                    refs = m.references,
                    it = c.image_threshold,
                    pt = c.pixel_threshold,
                    method = esc(&c.method),
                    ba = c.fit_balanced_accuracy,
                    n = c.normal_count,
                    a = c.anomaly_count,
                    f1 = c.pixel_fit_f1,
                );
                for name in &m.reference_files {
                    let pic = match m.thumbnails.get(name) {
                        Some(t) if !t.is_empty() => {
                            format!("<img alt=\"{0}\" src=\"data:image/jpeg;base64,{1}\">", esc(name), esc(t))
                        }
                        _ => "<div class=\"noimg\">no thumbnail</div>".into(),
                    };
                    let _ = write!(b, "<figure class=\"ref\">{pic}<figcaption>{}</figcaption></figure>", esc(name));
                }
                b.push_str("</div>");
            }
        }
        if !p.versions.is_empty() {
            b.push_str("<table class=\"versions\"><tr><th>version</th><th>change</th><th>when</th><th>references</th><th>learned</th><th>decision</th></tr>");
            for v in &p.versions {
                let _ = write!(
                    b,
                    "<tr class=\"{cur}\"><td>{ver}{mark}</td><td>{change}</td><td>{when}</td><td>{refs}</td><td>{learned}</td><td>{it:.4}</td></tr>",
                    cur = if v.current { "current" } else { "" },
                    ver = esc(&v.version),
                    mark = if v.current { " (current)" } else { "" },
                    change = esc(&v.change),
                    when = when(i64::try_from(v.changed_unix).unwrap_or(0).saturating_mul(1000)),
                    refs = v.references,
                    learned = v.learned,
                    it = v.image_threshold,
                );
            }
            b.push_str("</table>");
        }
        b.push_str("</section>");
    }
    layout("Products", "Products", &b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_from_frames_and_configs_is_escaped() {
        assert_eq!(esc("<a href=\"x\">'&"), "&lt;a href=&quot;x&quot;&gt;&#39;&amp;");
        assert_eq!(enc("cam-1/run 2/3"), "cam-1%2Frun%202%2F3");
        let mut s = crate::board::tests::shot("<cam>", 3, true);
        s.decided.answer = "<script>alert(1)</script>".into();
        let page = detail(&s, &Answering::On { token: true }, Some(true));
        assert!(!page.contains("<script>alert"), "escaped");
        assert!(page.contains("id=\"token\""), "asks for the token");
        assert!(page.contains("data-label=\"normal\"") && page.contains("data-label=\"defect\""));
        assert!(!detail(&s, &Answering::Off, None).contains("data-label"));
        assert_eq!(page.matches("id=\"token\"").count(), 1, "one token field for both");
        assert!(page.contains("id=\"ask-form\""));
    }

    #[test]
    fn the_gallery_links_each_defect_to_its_detail() {
        let shots = vec![std::sync::Arc::new(crate::board::tests::shot("a", 7, true))];
        let cams = vec!["a".to_string()];
        let page = defects(&shots, &Filter { cameras: &cams, products: &[], camera: Some("a"), product: None });
        assert!(page.contains("href=\"/console/defect?id=a%2Frun%2F7\""));
        assert!(page.contains("<option value=\"a\" selected>"));
    }
}
