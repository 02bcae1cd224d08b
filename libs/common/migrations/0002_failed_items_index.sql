-- Failed items by class: the errors-by-class counts, the failed filter of item lists and
-- exports, and replay by error class, without scanning a large batch's items.
CREATE INDEX items_failed ON items (batch_id, error_class) WHERE state = 'failed';
