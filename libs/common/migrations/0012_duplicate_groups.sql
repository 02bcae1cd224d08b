-- Near-duplicate groups per batch (libs/common/duplicates.py). A succeeded item's
-- duplicate_group is the id of the first item (lowest id, i.e. earliest in the input) of
-- the group of items whose perceptual hashes are within the batch's distance of a member
-- (or whose content is the same, for analyzers without a perceptual hash). NULL until
-- the grouper has seen the row: the writer inserts results without it, so grouping adds
-- nothing to the writer's transaction but one entry in the small partial index below.
ALTER TABLE results ADD COLUMN duplicate_group bigint;

-- The rows still to group: only those, so the grouper finds them at once whatever the
-- batch's size, and the index stays as small as the backlog.
CREATE INDEX results_ungrouped ON results (batch_id, item_id) WHERE duplicate_group IS NULL;
-- A group's members (the duplicate_group filter, GET /batches/{id}/duplicates).
CREATE INDEX results_duplicate_group ON results (batch_id, duplicate_group, item_id)
    WHERE duplicate_group IS NOT NULL;

-- One row per batch being grouped. Its row lock is the batch's grouping lock (one
-- grouper at a time per batch, whichever process); version moves with every grouping
-- transaction, so a grouper whose in-memory index is older rebuilds it from the ledger;
-- max_distance is fixed by the first grouping, so every process groups a batch alike.
CREATE TABLE duplicate_grouping (
    batch_id      uuid PRIMARY KEY REFERENCES batches (id) ON DELETE CASCADE,
    max_distance  int NOT NULL,
    version       bigint NOT NULL DEFAULT 0,
    updated_at    timestamptz NOT NULL DEFAULT now()
);

-- The groups of two or more items, with their sizes (kept by the grouper in the same
-- transaction as the members' duplicate_group), so listing a batch's groups never
-- counts a million rows.
CREATE TABLE duplicate_groups (
    batch_id  uuid NOT NULL REFERENCES batches (id) ON DELETE CASCADE,
    group_id  bigint NOT NULL,
    size      int NOT NULL,
    PRIMARY KEY (batch_id, group_id)
);
