ALTER TABLE dispatch_holds DROP COLUMN weight;
ALTER TABLE api_keys DROP COLUMN dispatch_weight;
