"""Training, shared by the student and the teachers: PROD's losses, a stage's training rows and their per-epoch
resampling, step arithmetic, DPD's selection rule and the student's trainer."""
