"""One integration test per way a login could be lost, pinned or hidden (issue 13): each drives a real
`harvester run` (or backfill) into the failure and checks what an operator would notice."""
