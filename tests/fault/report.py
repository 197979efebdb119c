"""The run's report: an HTML page with SVG timelines (throughput and latency of sends, fault
windows shaded, as Jepsen draws them), the checker's anomaly counts, and the seed."""
import html
import json

WIDTH, HEIGHT, MARGIN = 900, 220, 50
BUCKET_MS = 1000


def timelines(history_path):
    """Per-second buckets of send outcomes, latencies of acknowledged sends, and fault windows."""
    invoked_at = {}
    buckets = {}
    latencies = []  # (time_ms, latency_ms)
    faults = []  # (start_ms, end_ms, label)
    open_faults = []
    end_ms = 0
    with open(history_path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            op = json.loads(line)
            t = op.get("time_ms", 0)
            end_ms = max(end_ms, t)
            kind, fn = op.get("type"), op.get("f")
            if fn == "send":
                if kind == "invoke":
                    invoked_at[op["value"]] = t
                    continue
                b = buckets.setdefault(t // BUCKET_MS, {"ok": 0, "fail": 0, "info": 0})
                b[kind] = b.get(kind, 0) + 1
                start = invoked_at.pop(op.get("value"), None)
                if kind == "ok" and start is not None:
                    latencies.append((t, t - start))
            elif fn == "fault":
                label = op.get("error", "")
                if label.startswith("start "):
                    open_faults.append((t, label[len("start "):]))
                elif label.startswith("heal ") and open_faults:
                    s, lab = open_faults.pop(0)
                    faults.append((s, t, lab))
    for s, lab in open_faults:
        faults.append((s, end_ms, lab))
    return buckets, latencies, faults, end_ms


def _svg(title, end_ms, faults, series, y_max, y_label, points=None):
    w, h, m = WIDTH, HEIGHT, MARGIN
    end_ms = max(end_ms, 1)
    y_max = max(y_max, 1)

    def x(t):
        return m + (w - 2 * m) * t / end_ms

    def y(v):
        return h - m + -(h - 2 * m) * min(v, y_max) / y_max

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">',
           f'<text x="{m}" y="15" font-size="13">{html.escape(title)}</text>']
    for s, e, lab in faults:
        out.append(f'<rect x="{x(s):.1f}" y="{m}" width="{max(1.0, x(e) - x(s)):.1f}" height="{h - 2 * m}" '
                   f'fill="#f4b183" fill-opacity="0.45"><title>{html.escape(lab)}</title></rect>')
    out.append(f'<line x1="{m}" y1="{h - m}" x2="{w - m}" y2="{h - m}" stroke="black"/>')
    out.append(f'<line x1="{m}" y1="{m}" x2="{m}" y2="{h - m}" stroke="black"/>')
    out.append(f'<text x="{m - 5}" y="{m + 4}" text-anchor="end">{y_max:g}</text>')
    out.append(f'<text x="{m - 5}" y="{h - m}" text-anchor="end">0</text>')
    out.append(f'<text x="{m}" y="{h - m + 15}">0 s</text>')
    out.append(f'<text x="{w - m}" y="{h - m + 15}" text-anchor="end">{end_ms / 1000:.0f} s</text>')
    out.append(f'<text x="10" y="{h / 2}" transform="rotate(-90 10 {h / 2})">{html.escape(y_label)}</text>')
    for name, color, pts in series:
        if pts:
            d = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in pts)
            out.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{d}"><title>{name}</title></polyline>')
    for color, pts in points or []:
        for t, v in pts:
            out.append(f'<circle cx="{x(t):.1f}" cy="{y(v):.1f}" r="1.2" fill="{color}"/>')
    legend_x = w - m - 260
    for i, (name, color, _) in enumerate(series):
        out.append(f'<text x="{legend_x + i * 90}" y="15" fill="{color}">&#9632; {html.escape(name)}</text>')
    out.append("</svg>")
    return "\n".join(out)


def write_report(path, history_path, check, summary):
    buckets, latencies, faults, end_ms = timelines(history_path)
    seconds = range(0, end_ms // BUCKET_MS + 1)
    series = []
    for kind, color in (("ok", "#2e7d32"), ("info", "#f9a825"), ("fail", "#c62828")):
        series.append((f"{kind}/s", color, [(s * BUCKET_MS, buckets.get(s, {}).get(kind, 0)) for s in seconds]))
    y_max = max([v for _, _, pts in series for _, v in pts] + [1])
    throughput = _svg("sends per second (fault windows shaded)", end_ms, faults, series, y_max, "ops/s")
    # Per second: the median and the maximum latency of the sends acknowledged in it (one
    # point per send would make a long run's page hundreds of MB).
    per_second = {}
    for t, lat in latencies:
        per_second.setdefault(t // BUCKET_MS, []).append(lat)
    p50, pmax = [], []
    for sec in sorted(per_second):
        lats = sorted(per_second[sec])
        p50.append((sec * BUCKET_MS, lats[len(lats) // 2]))
        pmax.append((sec * BUCKET_MS, lats[-1]))
    lat_max = max([v for _, v in pmax] + [1])
    latency = _svg("latency of acknowledged sends per second, ms (fault windows shaded)", end_ms, faults,
                   [("median", "#1565c0", p50), ("max", "#6a1b9a", pmax)], lat_max, "ms")
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v}</td></tr>" for k, v in sorted(check["counts"].items()))
    fault_rows = "".join(f"<tr><td>{s / 1000:.1f}</td><td>{(e - s) / 1000:.1f}</td><td>{html.escape(lab)}</td></tr>"
                         for s, e, lab in faults)
    unavailable = "".join(
        f"<tr><td>{w['partition']}</td><td>{w['duration_ms'] / 1000:.1f}</td><td>{w['start_ms'] / 1000:.1f}</td></tr>"
        for w in check.get("longest_unavailable", []))
    examples = "".join(f"<li>{html.escape(a['kind'])} p{a['partition']} offset {a.get('offset')}: "
                       f"{html.escape(a['detail'])}</li>" for a in check.get("anomalies", [])[:50])
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>ferrite fault run seed {summary['seed']}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:2px 8px}}</style>
</head><body>
<h1>Fault run: {'PASS' if summary['passed'] else 'FAIL'}</h1>
<p>seed <b>{summary['seed']}</b>, {summary['nodes']} node(s), mode {html.escape(summary['mode'])},
{summary['faults_injected']} faults; command: <code>{html.escape(summary['command'])}</code></p>
<p>{html.escape('; '.join(summary.get('failures', [])) or 'no failure')}</p>
<h2>Anomalies</h2><table><tr><th>kind</th><th>count</th></tr>{rows}</table>
<p>sends: {check['sends']['invoked']} invoked, {check['sends']['ok']} ok, {check['sends']['fail']} failed,
{check['sends']['info']} unknown; polls ok {check['polls']['ok']}; fraction ok {check['fraction_ok']:.4f};
values acknowledged {check['values_acknowledged']}, read {check['values_read']}</p>
{throughput}
{latency}
<h2>Longest window without an acknowledged send, per partition</h2>
<table><tr><th>partition</th><th>seconds</th><th>from (s)</th></tr>{unavailable}</table>
<h2>Faults</h2><table><tr><th>start (s)</th><th>held (s)</th><th>fault</th></tr>{fault_rows}</table>
<h2>Anomaly examples (first 50)</h2><ul>{examples}</ul>
<h2>Summary</h2><pre>{html.escape(json.dumps(summary, indent=2))}</pre>
</body></html>
"""
    with open(path, "w", encoding="utf-8") as f:
        f.write(doc)
