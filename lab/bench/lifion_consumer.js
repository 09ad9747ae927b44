// The bench's adapter for lifion-kinesis (installed by `cargo xtask bench` at the version
// lab/bench/peers.toml pins): one consumer per process, run stock. Every record its
// callback receives is appended to BENCH_RECORD_LOG in the worker's record-log format
// (`unix-micros TAB worker TAB shard TAB 0 TAB sequence TAB data`; lifion has no lease
// counter). SIGTERM stops the consumer and exits.
'use strict';

const fs = require('fs');
const Kinesis = require('lifion-kinesis');

const env = (name) => {
  const value = process.env[name];
  if (!value) {
    console.error(`lifion_consumer.js: ${name} is not set`);
    process.exit(2);
  }
  return value;
};

if (process.env.BENCH_CREATE_TABLE_ONLY) {
  // Set-up, alone before the consumers: lifion's state table, keyed as lifion creates it.
  const AWS = require('aws-sdk');
  const db = new AWS.DynamoDB({
    region: 'us-east-1',
    accessKeyId: 'test',
    secretAccessKey: 'test',
    endpoint: env('BENCH_DYNAMODB_URL'),
  });
  const TableName = env('BENCH_TABLE');
  db.createTable({
    TableName,
    BillingMode: 'PAY_PER_REQUEST',
    AttributeDefinitions: [
      { AttributeName: 'consumerGroup', AttributeType: 'S' },
      { AttributeName: 'streamName', AttributeType: 'S' },
    ],
    KeySchema: [
      { AttributeName: 'consumerGroup', KeyType: 'HASH' },
      { AttributeName: 'streamName', KeyType: 'RANGE' },
    ],
  })
    .promise()
    .then(() => db.waitFor('tableExists', { TableName }).promise())
    .then(() => process.exit(0))
    .catch((err) => {
      console.error(`cannot create ${TableName}: ${err.message}`);
      process.exit(1);
    });
  return;
}

const worker = env('BENCH_WORKER');
const log = fs.openSync(env('BENCH_RECORD_LOG'), 'a');
const aws = { region: 'us-east-1', accessKeyId: 'test', secretAccessKey: 'test' };

const consumer = new Kinesis({
  ...aws,
  endpoint: env('BENCH_KINESIS_URL'),
  streamName: env('BENCH_STREAM'),
  consumerGroup: env('BENCH_APP'),
  createStreamIfNeeded: false,
  initialPositionInStream: 'TRIM_HORIZON',
  shouldParseJson: false,
  statsInterval: 3600000,
  dynamoDb: { ...aws, endpoint: env('BENCH_DYNAMODB_URL'), tableName: env('BENCH_TABLE') },
  logger: { debug: () => {}, warn: console.warn, error: console.error },
});

consumer.on('data', ({ records, shardId }) => {
  const micros = BigInt(Date.now()) * 1000n;
  const lines = records
    .map((r) => {
      const data = Buffer.isBuffer(r.data) ? r.data.toString('utf8') : String(r.data);
      return `${micros}\t${worker}\t${shardId}\t0\t${r.sequenceNumber}\t${data.replace(/[\t\r\n]/g, ' ')}\n`;
    })
    .join('');
  fs.writeSync(log, lines);
});
consumer.on('error', (err) => console.error(`lifion-kinesis error: ${err.message}`));

process.on('SIGTERM', () => {
  consumer.stopConsumer();
  process.exit(0);
});

consumer
  .startConsumer()
  .then(() => console.log(`${worker} started`))
  .catch((err) => {
    console.error(`cannot start: ${err.stack}`);
    process.exit(1);
  });
