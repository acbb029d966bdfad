/* Schedules (METHOD §5): lr warm-up + cosine, wd cosine, EMA momentum cosine to 1,
 * teacher temperature warm-up. Evaluated in double so CPU and GPU runs agree exactly. */
#include "schedule.h"

#include <math.h>

double af_cosine_schedule(double base, double final, int64_t warmup, double start,
                          int64_t total, int64_t step) {
    if (step < 0) step = 0;
    if (warmup > 0 && step < warmup) return start + (base - start) * (double)step / (double)warmup;
    int64_t span = total - (warmup > 0 ? warmup : 0);
    if (span <= 0 || step >= total) return final;
    double t = (double)(step - (warmup > 0 ? warmup : 0)) / (double)span;
    return final + 0.5 * (base - final) * (1.0 + cos(3.14159265358979323846 * t));
}

double af_linear_ramp(double start, double end, int64_t ramp, int64_t step) {
    if (ramp <= 0 || step >= ramp) return end;
    if (step < 0) step = 0;
    return start + (end - start) * (double)step / (double)ramp;
}

af_schedule_values af_schedule_at(const af_schedule *s, int64_t step) {
    af_schedule_values v;
    v.lr = af_cosine_schedule(s->lr, s->min_lr, s->warmup_steps, 0.0, s->total_steps, step);
    v.wd = af_cosine_schedule(s->wd, s->wd_end, 0, s->wd, s->total_steps, step);
    v.ema = af_cosine_schedule(s->ema, s->ema_end, 0, s->ema, s->total_steps, step);
    v.teacher_temp = af_linear_ramp(s->tt, s->tt_end, s->tt_warmup_steps, step);
    v.freeze_last_layer = step < s->freeze_last_steps;
    v.first_epoch = step < s->steps_per_epoch;
    return v;
}
