"""``editrl replay export``: the replay as a static, self-contained HTML contact sheet (sortable and filterable by URL
query, the judge's reasoning on hover and click) and, with ``--png``, matplotlib plots of the rewards. Read-only, with
the same short transactions as the other replay commands (:mod:`editrl.scripts.replay`)."""

from __future__ import annotations

import html
import time
from pathlib import Path
from typing import Any

from editrl.scripts.replay import (
    PAGE_SORTS,
    ReplayToolError,
    Snapshot,
    _fetch,
    _fmt,
    _snapshot,
    _summary,
    open_replay,
    resolve_lmdb,
)


def export_html(path: str | Path, html_dir: str | Path, png: bool = False, limit: int | None = None) -> dict[str, Any]:
    """A static, self-contained viewer: ``index.html`` plus ``img/g<seq>/{source,edit_<i>}.png`` next to it.

    Groups whose record is still stored are exported (the newest ``limit`` ones), in insertion order; the page's
    JavaScript sorts and filters them, starting from the URL query (``?sort=reward_desc&task_type=..&vmin=..&
    vmax=..&min_reward=..``; ``open=<group_id>:<edit>`` opens that edit's panel as a click would).
    With ``png``: ``reward_hist.png`` and ``reward_by_version.png`` (matplotlib, Agg).
    """
    if limit is not None and limit < 0:
        raise ReplayToolError(f"--limit must be >= 0, got {limit}")
    if png:
        _require_matplotlib()  # before any file is written
    out = Path(html_dir)
    sections, n_images, task_types = [], 0, set()
    with open_replay(path) as store:
        snap = _snapshot(store)
        out.mkdir(parents=True, exist_ok=True)
        stored = sorted((st["seq"], gid) for gid, st in snap.statuses if gid in snap.record_bytes)
        for seq, gid in stored[len(stored) - limit :] if limit is not None else stored:
            status, group = _fetch(store, gid)  # one short transaction per group; files written after it ended
            if status is None or group is None:  # evicted since the snapshot
                continue
            img_dir = out / "img" / f"g{seq}"
            img_dir.mkdir(parents=True, exist_ok=True)
            (img_dir / "source.png").write_bytes(group.source_png)
            for i, edit_png in enumerate(group.edit_pngs):
                (img_dir / f"edit_{i}.png").write_bytes(edit_png)
            n_images += 1 + len(group.edit_pngs)
            task_types.add(str(status.get("task_type")))
            sections.append(_group_html(gid, status, f"img/g{seq}", len(group.edit_pngs)))
    plots = _plots(snap, out) if png else []
    (out / "index.html").write_text(
        _page_html(sections, sorted(task_types), plots, str(resolve_lmdb(path))), encoding="utf-8"
    )
    return {"index": str(out / "index.html"), "groups": len(sections), "images": n_images, "plots": plots}


def _group_html(gid: str, status: dict[str, Any], img_prefix: str, n_edits: int) -> str:
    esc = html.escape
    rewards = status.get("rewards")
    scores = status.get("scores") or {}
    subs, reasons = scores.get("sub_scores") or [{}] * n_edits, scores.get("reasoning") or [""] * n_edits
    mean = _summary(rewards)["mean"] if rewards else None
    figures = [
        f'<figure class="src"><img src="{img_prefix}/source.png" alt="source"><figcaption>source</figcaption></figure>'
    ]
    for i in range(n_edits):
        reward = rewards[i] if rewards else None
        table = "".join(f"<tr><td>{esc(k)}</td><td>{v:.4f}</td></tr>" for k, v in subs[i].items())
        why = esc(reasons[i] or "(no reasoning)")
        detail = f"<b>edit {i}</b> reward {_fmt(reward, 4)}<table>{table}</table><p>{why}</p>"
        figures.append(
            f'<figure class="edit" data-edit="{i}" data-reward="{"" if reward is None else f"{reward:.6f}"}" '
            f'title="{esc(reasons[i] or "")}"><img src="{img_prefix}/edit_{i}.png" alt="edit {i}">'
            f'<figcaption>{_fmt(reward)}</figcaption><div class="detail" hidden>{detail}</div></figure>'
        )
    return (
        f'<section class="group" data-group-id="{esc(gid)}" data-reward="{"" if mean is None else f"{mean:.6f}"}" '
        f'data-version="{status.get("version")}" data-task-type="{esc(str(status.get("task_type")))}" '
        f'data-seq="{status.get("seq")}" data-state="{esc(str(status.get("state")))}">'
        f"<header><b>{esc(str(status.get('instruction')))}</b> · {esc(str(status.get('task_type')))} · "
        f"v{status.get('version')} · {esc(str(status.get('state')))} · mean {_fmt(mean)} · <code>{esc(gid)}</code>"
        f'</header><div class="row">{"".join(figures)}</div><div class="panel" hidden></div></section>'
    )


_CSS = """body{font:13px sans-serif;margin:12px;background:#fafafa}[hidden]{display:none!important}
#controls label{margin-right:12px}.group{background:#fff;border:1px solid #ddd;margin:8px 0;padding:6px}
.row{display:flex;flex-wrap:wrap;gap:6px}figure{margin:0;text-align:center;cursor:pointer}
figure img{width:96px;height:96px;image-rendering:pixelated;border:1px solid #ccc}.src img{border-color:#36c}
.panel{background:#f4f4ff;padding:6px;margin-top:6px}.panel td{padding:0 8px 0 0}.plots img{max-width:45%}
input[type=number]{width:5em}"""

_JS = """(function(){
const list=document.getElementById('groups'), groups=Array.from(list.querySelectorAll('.group'));
const ids=['sort','task_type','vmin','vmax','min_reward'], ctl={}, q=new URLSearchParams(location.search);
for(const k of ids){ctl[k]=document.getElementById(k); if(q.has(k)) ctl[k].value=q.get(k);
  ctl[k].addEventListener('change',()=>{apply(); save();});}
function num(el,a){const v=el.dataset[a]; return v===undefined||v===''?NaN:Number(v);}
function apply(){
  const parts=(ctl.sort.value||'time_asc').split('_'), sign=parts[1]==='desc'?-1:1;
  const f={reward:'reward',version:'version',time:'seq'}[parts[0]]||'seq';
  groups.sort((a,b)=>{const x=num(a,f), y=num(b,f);
    if(isNaN(x)!==isNaN(y)) return isNaN(x)?1:-1;
    if(!isNaN(x)&&x!==y) return sign*(x-y);
    return num(a,'seq')-num(b,'seq');});
  const tt=ctl.task_type.value, lo=parseFloat(ctl.vmin.value), hi=parseFloat(ctl.vmax.value),
    mr=parseFloat(ctl.min_reward.value);
  let shown=0;
  for(const g of groups){list.appendChild(g); const r=num(g,'reward'), v=num(g,'version');
    const ok=(!tt||g.dataset.taskType===tt)&&(isNaN(lo)||v>=lo)&&(isNaN(hi)||v<=hi)&&(isNaN(mr)||(!isNaN(r)&&r>=mr));
    g.hidden=!ok; if(ok) shown++;}
  document.getElementById('shown').textContent=shown;
  const d=document.body.dataset; d.shown=shown; d.sort=ctl.sort.value||'time_asc'; d.ready='1';}
function save(){try{const u=new URL(location.href);
  for(const k of ids){if(ctl[k].value) u.searchParams.set(k,ctl[k].value); else u.searchParams.delete(k);}
  history.replaceState(null,'',u.toString());}catch(e){}}
list.addEventListener('click',e=>{const f=e.target.closest('figure.edit'); if(!f) return;
  const p=f.closest('.group').querySelector('.panel'), same=!p.hidden&&p.dataset.edit===f.dataset.edit;
  p.dataset.edit=f.dataset.edit; p.innerHTML=f.querySelector('.detail').innerHTML; p.hidden=same;});
apply();
const open=(q.get('open')||'').split(':');  // ?open=<group_id>:<edit>: the panel of that edit, as if clicked
const hit=open.length===2&&groups.find(g=>g.dataset.groupId===open[0]);
const fig=hit&&hit.querySelector('figure.edit[data-edit="'+Number(open[1])+'"]'); if(fig) fig.click();})();"""


def _page_html(sections: list[str], task_types: list[str], plots: list[str], source: str) -> str:
    esc = html.escape
    sort_opts = "".join(f'<option value="{s}">{s.replace("_", " ")}</option>' for s in PAGE_SORTS)
    type_opts = '<option value="">all</option>' + "".join(
        f'<option value="{esc(t)}">{esc(t)}</option>' for t in task_types
    )
    plot_imgs = "".join(f'<img class="plot" src="{esc(p)}" alt="{esc(p)}">' for p in plots)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>editrl replay</title><style>{_CSS}</style></head>
<body data-ready="0"><h1>editrl replay</h1><p>{esc(source)} · exported {time.strftime("%Y-%m-%d %H:%M:%S")} ·
<span id="shown">{len(sections)}</span> of <span id="total">{len(sections)}</span> groups shown ·
hover an edit for the judge's reasoning, click it for sub-scores</p>
<div id="controls"><label>sort <select id="sort">{sort_opts}</select></label>
<label>task type <select id="task_type">{type_opts}</select></label>
<label>version <input id="vmin" type="number" size="4"> – <input id="vmax" type="number" size="4"></label>
<label>min reward <input id="min_reward" type="number" step="0.1" size="4"></label></div>
<div class="plots">{plot_imgs}</div>
<main id="groups">
{chr(10).join(sections)}
</main><script>{_JS}</script></body></html>
"""


def _require_matplotlib() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise ReplayToolError("--png needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")  # files only, never a display
    return matplotlib


def _plots(snap: Snapshot, out: Path) -> list[str]:
    _require_matplotlib()
    import matplotlib.pyplot as plt

    scored = [st for _, st in snap.statuses if st.get("rewards")]
    rewards = [r for st in scored for r in st["rewards"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(rewards, bins=30, range=(0, 10), color="#36c")
    ax.set(xlabel="edit reward (overall)", ylabel="edits", title=f"edit rewards (n={len(rewards)})")
    fig.savefig(out / "reward_hist.png", dpi=80)
    plt.close(fig)
    per_version: dict[int, list[float]] = {}
    for st in scored:
        per_version.setdefault(st["version"], []).extend(st["rewards"])
    versions = sorted(per_version)
    summaries = [_summary(per_version[v]) for v in versions]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.errorbar(versions, [s["mean"] for s in summaries], yerr=[s["std"] for s in summaries], fmt="o-", capsize=3)
    ax.set_xticks(versions)
    ax.set(xlabel="policy version", ylabel="edit reward, mean ± std", title="reward by version")
    fig.savefig(out / "reward_by_version.png", dpi=80)
    plt.close(fig)
    return ["reward_hist.png", "reward_by_version.png"]


# -- text output --------------------------------------------------------------------------------------------------
