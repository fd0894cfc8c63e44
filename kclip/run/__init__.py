"""`kclip run`: the whole Knowledge-CLIP method end to end on one machine, as resumable stages, with a report.

kclip.run.config (presets and run configs), kclip.run.pipeline (the stages), kclip.run.report (report.md and plots).
"""
