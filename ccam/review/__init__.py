"""Clinician review of a stage's masks: triage flags, the static HTML report, and recorded decisions.

``flags``      per-case measurements and flags computed from masks, tags and images (never ground truth)
``render``     matplotlib pictures of a case: axial slices, a coronal and a sagittal reformat
``report``     the report folder: ``index.html``, ``cases/<id>.html`` and their PNGs (Jinja2 templates)
``decisions``  accept / needs edit / reject per case in ``W/review/decisions.json``, and how
               `train-seg` applies them
"""
