/* Per-iteration schedules of METHOD §5 (as DINO evaluates them: one value per step). */
#ifndef AFIRE_SCHEDULE_H
#define AFIRE_SCHEDULE_H
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Linear warm-up from `start` to `base` over `warmup` steps, then a half cosine from `base`
 * to `final` over the remaining total - warmup steps. Steps past `total` stay at `final`. */
double af_cosine_schedule(double base, double final, int64_t warmup, double start,
                          int64_t total, int64_t step);

/* Linear ramp from `start` to `end` over `ramp` steps, then constant at `end`. */
double af_linear_ramp(double start, double end, int64_t ramp, int64_t step);

typedef struct {
    int64_t total_steps, steps_per_epoch;
    double lr, min_lr;            int64_t warmup_steps;
    double wd, wd_end;
    double ema, ema_end;          /* EMA momentum lambda0 -> 1 */
    double tt, tt_end;            int64_t tt_warmup_steps; /* teacher temperature (paper) */
    int64_t freeze_last_steps;    /* head last layer frozen while step < this */
} af_schedule;

typedef struct {
    double lr, wd, ema, teacher_temp;
    int freeze_last_layer, first_epoch;
} af_schedule_values;

af_schedule_values af_schedule_at(const af_schedule *s, int64_t step);

#ifdef __cplusplus
}
#endif
#endif
