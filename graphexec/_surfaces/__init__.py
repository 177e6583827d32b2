"""The surfaces users call: compute, flows and futures, the public Pool, progress, reports.

Importing this package fills the model's seam (``_model/seam.py``), the one
door through which ``Graph.compute``, ``Graph.visualize``, ``Run.to_html``,
the notebook views (``_repr_html_``) and task calls in a flow reach the
layers that carry them out.
"""

from .._model.seam import surfaces as _seam
from . import notebook as _notebook
from . import record as _record
from . import replay as _replay
from . import report as _report
from .compute import compute as _compute
from .eager import call_eagerly as _call_eagerly
from .eager import submit as _submit

_seam.install(
    compute=_compute,
    visualize=_report.visualize,
    run_to_json=_report.run_to_json,
    run_from_json=_report.run_from_json,
    run_to_html=_report.run_to_html,
    call_eagerly=_call_eagerly,
    submit=_submit,
    run_html=_notebook.run_html,
    graph_html=_notebook.graph_html,
    state_html=_notebook.state_html,
    run_inputs=_replay.run_inputs,
    run_replay=_replay.run_replay,
    replay_hint=_replay.replay_hint,
    run_save=_record.save_run,
    run_load=_record.load_run,
)
