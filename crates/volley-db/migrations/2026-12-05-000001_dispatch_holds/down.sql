DROP TABLE dispatch_holds;
