"""What a run leaves and reads back: its folder (plan, fingerprints, lock), the checks before it starts
(preflight), its log, its report and its model card."""
