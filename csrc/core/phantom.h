/* Synthetic frontal chest radiographs ("phantoms") for demos and tests.
 *
 * A phantom is drawn analytically in anatomical coordinates (u right, v down, both in
 * [-1, 1] for the nominal subject) and rasterised at S x S: body outline, two dark lung
 * fields, posterior and anterior ribs, clavicles, heart shadow, mediastinum with trachea,
 * spine, diaphragm domes, lung markings, quantum noise. Every random choice comes from
 * the Philox stream af_stream(AF_RNG_PHANTOM, subject >> 24, subject & 0xFFFFFF) under
 * `seed`, so an image is a pure function of (seed, subject, lesion_kind, S): the same
 * subject with and without a lesion has the same anatomy and the same noise, and the two
 * images differ only where the lesion adds density.
 *
 * Organ labels (uint8): 0 background (outside the body), 1 lung fields, 2 heart,
 * 3 mediastinum and spine, 4 below the diaphragm, 5 other soft tissue (chest wall,
 * shoulders, neck). Ribs and clavicles overlay these and carry no label of their own.
 */
#ifndef AFIRE_PHANTOM_H
#define AFIRE_PHANTOM_H

#include <stdint.h>

#include "afire.h"

enum {
    PHANTOM_NONE = 0,
    PHANTOM_NODULE = 1,        /* bright round opacity inside a lung                  */
    PHANTOM_CONSOLIDATION = 2, /* patchy bright region inside a lung                  */
    PHANTOM_EFFUSION = 3,      /* homogeneous basal opacity with a lateral meniscus   */
    PHANTOM_NUM_KINDS = 4
};

enum {
    PHANTOM_LABEL_BACKGROUND = 0,
    PHANTOM_LABEL_LUNG = 1,
    PHANTOM_LABEL_HEART = 2,
    PHANTOM_LABEL_MEDIASTINUM = 3,
    PHANTOM_LABEL_ABDOMEN = 4,
    PHANTOM_LABEL_SOFT_TISSUE = 5
};

#define PHANTOM_MIN_SIZE 8
#define PHANTOM_MAX_SIZE 4096

/* One S x S image of `subject`. lesion_mask (nullable) is 1 on the lesion, always a subset
 * of the lung label; organ_labels (nullable) as above. lesion_kind in PHANTOM_NONE..
 * PHANTOM_EFFUSION. AF_EINVAL for a bad size or kind. */
af_status af_phantom_generate(uint8_t *img, uint8_t *lesion_mask, uint8_t *organ_labels, int S,
                           uint64_t seed, uint64_t subject, int lesion_kind);

/* B images of subjects first_subject .. first_subject+B-1 (OpenMP over images).
 * Image b is abnormal when a uniform draw of its own subject stream is < p_abnormal; its
 * kind is `lesion_kind` (1..3), or uniform over the three kinds when lesion_kind is -1.
 * labels[b] receives the kind drawn (0 = normal). Outputs: img, lesion_masks and
 * organ_labels [B, S, S] (the last two nullable), labels [B] (nullable). */
af_status af_phantom_generate_batch(uint8_t *img, uint8_t *lesion_masks, uint8_t *organ_labels,
                                 int32_t *labels, int B, int S, uint64_t seed,
                                 uint64_t first_subject, int lesion_kind, float p_abnormal);

#endif
