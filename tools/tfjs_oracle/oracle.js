#!/usr/bin/env node
// Reference oracle for facepay/models/tfjs.py: run a TF.js graph model with the pure-JS
// @tensorflow/tfjs CPU backend, loaded from files on disk through an in-memory IO handler.
//
//   node oracle.js --model DIR/NAME.json --out OUTDIR \
//       --input NAME=FILE.npy [--input NAME=FILE.f32:1x192x192x3 ...] [--outputs a:0,b]
//
// Inputs: little-endian float32 .npy (C order), or raw float32 with the shape after a colon;
// every graph input must be given. Outputs (default: the model's own output nodes) are written as
// OUTDIR/<i>.f32 (raw little-endian float32) plus OUTDIR/outputs.json:
//   [{"name": "Identity:0", "shape": [1, 2], "file": "0.f32"}, ...]
'use strict';

const fs = require('fs');
const path = require('path');
const tf = require('@tensorflow/tfjs');

function parseArgs(argv) {
  const args = { inputs: [], outputs: null, model: null, out: null };
  for (let i = 0; i < argv.length; i += 1) {
    const key = argv[i];
    const value = argv[i + 1];
    if (key === '--model') args.model = value;
    else if (key === '--out') args.out = value;
    else if (key === '--input') args.inputs.push(value);
    else if (key === '--outputs') args.outputs = value.split(',').filter((s) => s.length > 0);
    else throw new Error(`unknown argument ${key}`);
    i += 1;
  }
  if (!args.model || !args.out || args.inputs.length === 0) {
    throw new Error('usage: oracle.js --model NAME.json --out DIR --input NAME=FILE.npy [--outputs a,b]');
  }
  return args;
}

// A .npy file (format 1.x/2.x/3.x) holding '<f4' data in C order.
function readNpy(file) {
  const buf = fs.readFileSync(file);
  if (buf.toString('latin1', 0, 6) !== '\x93NUMPY') throw new Error(`${file} is not a .npy file`);
  const major = buf[6];
  const headerLen = major === 1 ? buf.readUInt16LE(8) : buf.readUInt32LE(8);
  const start = (major === 1 ? 10 : 12) + headerLen;
  const header = buf.toString('latin1', major === 1 ? 10 : 12, start);
  if (!/'descr':\s*'<f4'/.test(header)) throw new Error(`${file}: only little-endian float32 is supported (${header})`);
  if (/'fortran_order':\s*True/.test(header)) throw new Error(`${file}: Fortran order is not supported`);
  const shapeText = header.match(/'shape':\s*\(([^)]*)\)/)[1];
  const shape = shapeText.split(',').map((s) => s.trim()).filter((s) => s.length > 0).map(Number);
  const data = new Float32Array(buf.buffer.slice(buf.byteOffset + start, buf.byteOffset + buf.length));
  return { shape, data };
}

function readInput(spec) {
  const eq = spec.indexOf('=');
  if (eq < 0) throw new Error(`--input wants NAME=FILE, got ${spec}`);
  const name = spec.slice(0, eq);
  let file = spec.slice(eq + 1);
  let arr;
  const m = file.match(/^(.*):(\d+(?:x\d+)*)$/);
  if (m && !file.endsWith('.npy')) {
    file = m[1];
    const shape = m[2].split('x').map(Number);
    const buf = fs.readFileSync(file);
    arr = { shape, data: new Float32Array(buf.buffer.slice(buf.byteOffset, buf.byteOffset + buf.length)) };
  } else {
    arr = readNpy(file);
  }
  const count = arr.shape.reduce((a, b) => a * b, 1);
  if (count !== arr.data.length) throw new Error(`${file}: ${arr.data.length} values for shape ${arr.shape}`);
  return [name, tf.tensor(arr.data, arr.shape, 'float32')];
}

// The model's artifacts from disk: topology, weight specs and all weight shards concatenated.
function loadArtifacts(modelJson) {
  const json = JSON.parse(fs.readFileSync(modelJson, 'utf8'));
  const dir = path.dirname(modelJson);
  const weightSpecs = [];
  const shards = [];
  for (const group of json.weightsManifest) {
    weightSpecs.push(...group.weights);
    for (const p of group.paths) shards.push(fs.readFileSync(path.join(dir, p)));
  }
  const all = Buffer.concat(shards);
  const weightData = all.buffer.slice(all.byteOffset, all.byteOffset + all.length);
  return {
    modelTopology: json.modelTopology,
    weightSpecs,
    weightData,
    format: json.format,
    generatedBy: json.generatedBy,
    convertedBy: json.convertedBy,
    signature: json.signature,
    userDefinedMetadata: json.userDefinedMetadata,
  };
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  await tf.setBackend('cpu');
  await tf.ready();
  const model = await tf.loadGraphModel(tf.io.fromMemory(loadArtifacts(args.model)));
  const feeds = Object.fromEntries(args.inputs.map(readInput));
  const outputNames = args.outputs || model.outputs.map((o) => o.name);
  let results = model.execute(feeds, outputNames);
  if (!Array.isArray(results)) results = [results];
  fs.mkdirSync(args.out, { recursive: true });
  const manifest = [];
  for (let i = 0; i < results.length; i += 1) {
    const values = results[i].dataSync();
    const data = values instanceof Float32Array ? values : Float32Array.from(values);
    const file = `${i}.f32`;
    fs.writeFileSync(path.join(args.out, file), Buffer.from(data.buffer, data.byteOffset, data.byteLength));
    manifest.push({ name: outputNames[i], shape: results[i].shape, file, backend: tf.getBackend() });
  }
  fs.writeFileSync(path.join(args.out, 'outputs.json'), JSON.stringify(manifest, null, 1));
}

main().catch((err) => {
  process.stderr.write(`${err.stack || err}\n`);
  process.exit(1);
});
