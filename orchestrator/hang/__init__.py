"""Hang diagnosis in one place.

  health.py    rank side: the Health record the training thread writes, the heartbeat thread
               that sends it (and answers Flight Recorder dump requests)
  rules.py     pure rules: the stall threshold, who holds the group up, the Flight Recorder view
  watchdog.py  the controller's watchdog: when a group has stalled, and the report naming the culprit
  procstate.py the kernel's view of a late rank's process (/proc state, wchan), read on its node
  followup.py  after a stall: Flight Recorder dumps from the ranks, checks of the suspect nodes
  stragglers.py  which rank computes slower than its peers: a CUSUM per rank on compute-time ratios
  view.py      `orchestrator diagnose`

The actor shells stay in actors/ (health.py: the monitor; node_check.py: the node checks).
"""
